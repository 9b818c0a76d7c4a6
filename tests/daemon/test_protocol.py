"""
Unit tests for L{hyperdaemon.daemon.protocol}: the health protocol's parsing,
replies, authorization and slow-client handling, over a L{StringTransport}
with a fake daemon and a L{Clock}.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.task import Clock
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from hyperdaemon.daemon.protocol import HealthFactory, HealthProtocol

VERSION = "9.8.7"
#: A STATUS object with nesting, non-ASCII text and an embedded newline.
STATUS = {
    "pid": 4242,
    "hyperd_endpoint": "127.0.0.1:40001",
    "health_port": 40000,
    "started_at": "2024-01-02T03:04:05Z",
    "version": VERSION,
    "compat": False,
    "restarts": 0,
    "sessions": [{"id": "s1", "pid": 77, "ephemeral_db": "/tmp/é x.hyper"}],
    "note": "two\nlines",
}


class FakeTarget:
    """A L{HealthTarget} that records which of its methods were called."""

    version = VERSION

    def __init__(self) -> None:
        self.calls: list[str] = []

    def touch(self) -> None:
        self.calls.append("touch")

    def status(self) -> dict[str, Any]:
        self.calls.append("status")
        return STATUS

    def stop(self) -> None:
        self.calls.append("stop")

    def report_hyperd_error(self) -> None:
        self.calls.append("report_hyperd_error")

    #: What attach_session / when_ready hand back; tests replace them.
    ready: Deferred[dict[str, Any]] | None = None

    def attach_session(self, fields: dict[str, Any]) -> tuple[str, Deferred[dict[str, Any]]]:
        if "pid" not in fields:
            raise ValueError("SESSION needs pid")
        self.calls.append(f"attach {fields['pid']}")
        ready = self.ready if self.ready is not None else succeed({"hyperd_endpoint": "h:1"})
        return "s1", ready.addCallback(lambda facts: {"id": "s1", **facts})

    def end_session(self, session_id: str, clean: bool) -> None:
        self.calls.append(f"end {session_id} clean={clean}")

    def when_ready(self) -> Deferred[dict[str, Any]]:
        self.calls.append("when_ready")
        return self.ready if self.ready is not None else succeed({"hyperd_endpoint": "h:1"})


class FakeAuthorizer:
    """An authorizer with a fixed answer that records each consultation."""

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed
        self.consulted: list[object] = []

    def __call__(self, transport: object) -> bool:
        self.consulted.append(transport)
        return self.allowed


class HealthProtocolTestsMixin:
    """
    Builds connected protocols through L{HealthFactory}; each one's
    connection is lost after the test.
    """

    @pytest.fixture(autouse=True)
    def _connections(self) -> Iterator[None]:
        self.protocols: list[HealthProtocol] = []
        yield
        for proto in reversed(self.protocols):
            proto.connectionLost(Failure(ConnectionDone()))

    def connect(self, allowed: bool = True) -> tuple[HealthProtocol, StringTransport]:
        self.clock = Clock()
        self.target = FakeTarget()
        self.authorize = FakeAuthorizer(allowed)
        self.factory = HealthFactory(self.target, self.authorize)
        return self.open_connection()

    def open_connection(self) -> tuple[HealthProtocol, StringTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        # Never the global reactor: a leaked 30 s timer would dirty later tests.
        proto.callLater = self.clock.callLater
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 40000),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
        )
        proto.makeConnection(transport)
        self.protocols.append(proto)
        return proto, transport

    def exchange(self, proto: HealthProtocol, transport: StringTransport, data: bytes) -> bytes:
        """Deliver C{data}; return what the protocol wrote in response."""
        transport.clear()
        proto.dataReceived(data)
        return transport.value()


class CommandTests(HealthProtocolTestsMixin):
    """Each SPEC command gets its byte-exact reply and effect."""

    def test_ping_replies_pong_with_product_and_version(self) -> None:
        proto, transport = self.connect()
        assert self.exchange(proto, transport, b"PING\n") == b"PONG hyperdb-mcp 9.8.7\n"

    def test_heartbeat_replies_ok(self) -> None:
        proto, transport = self.connect()
        assert self.exchange(proto, transport, b"HEARTBEAT\n") == b"OK\n"

    def test_status_replies_one_line_of_compact_json_equal_to_target_status(self) -> None:
        proto, transport = self.connect()
        reply = self.exchange(proto, transport, b"STATUS\n")
        assert reply.endswith(b"\n")
        assert reply.count(b"\n") == 1
        body = reply[:-1]
        assert json.loads(body.decode("utf-8")) == STATUS
        # Compact: no space after the separators (the only spaces are inside
        # the string values, and STATUS has exactly one such space).
        assert b", " not in body
        assert b": " not in body
        assert self.target.calls.count("status") == 1

    def test_stop_replies_stopping_and_stops_target(self) -> None:
        proto, transport = self.connect()
        assert self.exchange(proto, transport, b"STOP\n") == b"STOPPING\n"
        assert self.target.calls.count("stop") == 1

    def test_report_hyperd_error_replies_ok_and_notifies_target(self) -> None:
        proto, transport = self.connect()
        assert self.exchange(proto, transport, b"REPORT_HYPERD_ERROR\n") == b"OK\n"
        assert self.target.calls.count("report_hyperd_error") == 1

    def test_only_stop_calls_stop_and_only_report_calls_report(self) -> None:
        proto, transport = self.connect()
        self.exchange(proto, transport, b"PING\nHEARTBEAT\nSTATUS\nNOPE\n")
        assert "stop" not in self.target.calls
        assert "report_hyperd_error" not in self.target.calls

    def test_each_accepted_command_touches_target_once(self) -> None:
        proto, transport = self.connect()
        self.exchange(proto, transport, b"HEARTBEAT\nSTATUS\nREPORT_HYPERD_ERROR\nPING\n")
        assert self.target.calls.count("touch") == 4

    def test_unknown_command_replies_err_and_connection_stays_usable(self) -> None:
        proto, transport = self.connect()
        assert self.exchange(proto, transport, b"FROBNICATE\n") == b"ERR unknown command\n"
        assert not transport.disconnecting
        assert self.exchange(proto, transport, b"PING\n") == b"PONG hyperdb-mcp 9.8.7\n"

    def test_lowercase_command_is_unknown(self) -> None:
        proto, transport = self.connect()
        assert self.exchange(proto, transport, b"ping\n") == b"ERR unknown command\n"
        assert self.exchange(proto, transport, b"stop\n") == b"ERR unknown command\n"
        assert "stop" not in self.target.calls

    def test_empty_line_is_unknown_and_connection_stays_usable(self) -> None:
        proto, transport = self.connect()
        assert self.exchange(proto, transport, b"\n") == b"ERR unknown command\n"
        assert self.exchange(proto, transport, b"  \t\r\n") == b"ERR unknown command\n"
        assert not transport.disconnecting
        assert self.exchange(proto, transport, b"PING\n") == b"PONG hyperdb-mcp 9.8.7\n"

    def test_several_commands_in_one_write_get_replies_in_order(self) -> None:
        proto, transport = self.connect()
        reply = self.exchange(
            proto, transport, b"HEARTBEAT\nPING\nNOPE\nSTOP\nREPORT_HYPERD_ERROR\n"
        )
        assert reply == b"OK\nPONG hyperdb-mcp 9.8.7\nERR unknown command\nSTOPPING\nOK\n"

    def test_command_split_across_writes_is_answered_once_complete(self) -> None:
        proto, transport = self.connect()
        assert self.exchange(proto, transport, b"PI") == b""
        assert self.exchange(proto, transport, b"NG\nHEART") == b"PONG hyperdb-mcp 9.8.7\n"
        assert self.exchange(proto, transport, b"BEAT\n") == b"OK\n"

    def test_crlf_line_endings_are_accepted(self) -> None:
        proto, transport = self.connect()
        assert (self.exchange(proto, transport, b"PING\r\nHEARTBEAT\r\n")
                == b"PONG hyperdb-mcp 9.8.7\nOK\n")

    def test_surrounding_whitespace_is_trimmed(self) -> None:
        proto, transport = self.connect()
        assert self.exchange(proto, transport, b"  \tPING \t\n") == b"PONG hyperdb-mcp 9.8.7\n"
        assert self.exchange(proto, transport, b" STOP  \r\n") == b"STOPPING\n"
        assert self.target.calls.count("stop") == 1

    def test_invalid_utf8_replies_err_and_connection_stays_usable(self) -> None:
        proto, transport = self.connect()
        assert self.exchange(proto, transport, b"PI\xffNG\n") == b"ERR invalid utf-8\n"
        assert not transport.disconnecting
        assert self.exchange(proto, transport, b"PING\n") == b"PONG hyperdb-mcp 9.8.7\n"


class LineLengthTests(HealthProtocolTestsMixin):
    """A line longer than MAX_LENGTH ends the connection."""

    def test_line_longer_than_max_length_replies_err_and_closes(self) -> None:
        proto, transport = self.connect()
        line = b"A" * (HealthProtocol.MAX_LENGTH + 1) + b"\n"
        assert self.exchange(proto, transport, line) == b"ERR line too long\n"
        assert transport.disconnecting

    def test_unterminated_data_longer_than_max_length_replies_err_and_closes(self) -> None:
        proto, transport = self.connect()
        assert (self.exchange(proto, transport, b"A" * (HealthProtocol.MAX_LENGTH + 2))
                == b"ERR line too long\n")
        assert transport.disconnecting

    def test_line_of_exactly_max_length_is_not_too_long(self) -> None:
        proto, transport = self.connect()
        line = b"A" * HealthProtocol.MAX_LENGTH + b"\n"
        assert self.exchange(proto, transport, line) == b"ERR unknown command\n"
        assert not transport.disconnecting

    def test_commands_after_an_overlong_line_are_not_executed(self) -> None:
        proto, transport = self.connect()
        data = b"A" * (HealthProtocol.MAX_LENGTH + 1) + b"\nSTOP\n"
        assert self.exchange(proto, transport, data) == b"ERR line too long\n"
        assert "stop" not in self.target.calls

    def test_closing_unregisters_the_read_throttle(self) -> None:
        # A real transport finishes loseConnection only once no streaming
        # producer is registered.
        proto, transport = self.connect()
        assert transport.producer is not None
        self.exchange(proto, transport, b"A" * (HealthProtocol.MAX_LENGTH + 1) + b"\n")
        assert transport.producer is None

    def test_no_timeout_reply_follows_a_line_too_long_close(self) -> None:
        proto, transport = self.connect()
        self.exchange(proto, transport, b"A" * (HealthProtocol.MAX_LENGTH + 1) + b"\n")
        transport.clear()
        self.clock.advance(HealthProtocol.timeOut + 1)
        assert transport.value() == b""


class AuthorizationTests(HealthProtocolTestsMixin):
    """A peer that authorize refuses may only PING."""

    def test_refused_peer_may_ping(self) -> None:
        proto, transport = self.connect(allowed=False)
        assert self.exchange(proto, transport, b"PING\n") == b"PONG hyperdb-mcp 9.8.7\n"

    def test_refused_peer_gets_forbidden_for_every_other_command(self) -> None:
        proto, transport = self.connect(allowed=False)
        for line in [b"STATUS", b"STOP", b"HEARTBEAT", b"REPORT_HYPERD_ERROR", b"NOPE", b""]:
            assert self.exchange(proto, transport, line + b"\n") == b"ERR forbidden\n", line
        assert not transport.disconnecting

    def test_refused_peer_cannot_stop_read_status_or_touch(self) -> None:
        proto, transport = self.connect(allowed=False)
        self.exchange(proto, transport, b"STATUS\nSTOP\nHEARTBEAT\nREPORT_HYPERD_ERROR\nNOPE\n")
        assert self.target.calls == []

    def test_refused_peer_can_still_ping_after_forbidden_commands(self) -> None:
        proto, transport = self.connect(allowed=False)
        self.exchange(proto, transport, b"STOP\n")
        assert self.exchange(proto, transport, b"PING\n") == b"PONG hyperdb-mcp 9.8.7\n"

    def test_authorize_is_given_the_connection_transport(self) -> None:
        proto, transport = self.connect()
        self.exchange(proto, transport, b"STATUS\n")
        assert self.authorize.consulted == [transport]

    def test_authorize_is_consulted_once_per_connection_when_allowed(self) -> None:
        proto, transport = self.connect(allowed=True)
        self.exchange(proto, transport, b"STATUS\nHEARTBEAT\n")
        self.exchange(proto, transport, b"REPORT_HYPERD_ERROR\nNOPE\nSTOP\n")
        assert len(self.authorize.consulted) == 1

    def test_authorize_is_consulted_once_per_connection_when_refused(self) -> None:
        proto, transport = self.connect(allowed=False)
        self.exchange(proto, transport, b"STATUS\nHEARTBEAT\n")
        self.exchange(proto, transport, b"STOP\nNOPE\n")
        assert len(self.authorize.consulted) == 1

    def test_ping_does_not_consult_authorize(self) -> None:
        proto, transport = self.connect()
        self.exchange(proto, transport, b"PING\nPING\n")
        assert self.authorize.consulted == []

    def test_refused_peers_ping_does_not_keep_the_daemon_awake(self) -> None:
        proto, transport = self.connect(allowed=False)
        self.exchange(proto, transport, b"STATUS\nPING\nPING\n")
        assert self.target.calls == []

    def test_a_known_users_ping_counts_as_activity(self) -> None:
        proto, transport = self.connect(allowed=True)
        self.exchange(proto, transport, b"HEARTBEAT\n")
        self.target.calls.clear()
        self.exchange(proto, transport, b"PING\n")
        assert self.target.calls == ["touch"]

    def test_a_lone_ping_is_no_activity(self) -> None:
        proto, transport = self.connect(allowed=True)
        self.exchange(proto, transport, b"PING\n")
        assert self.target.calls == []

    def test_each_connection_is_authorized_on_its_own(self) -> None:
        proto1, transport1 = self.connect()
        proto2, transport2 = self.open_connection()
        self.exchange(proto1, transport1, b"STATUS\n")
        self.exchange(proto2, transport2, b"STATUS\n")
        assert self.authorize.consulted == [transport1, transport2]


class TimeoutTests(HealthProtocolTestsMixin):
    """A connection that sends no whole line for timeOut seconds is dropped."""

    def test_silent_connection_is_not_dropped_before_the_timeout(self) -> None:
        proto, transport = self.connect()
        self.clock.advance(HealthProtocol.timeOut - 0.5)
        assert transport.value() == b""
        assert not transport.disconnecting

    def test_silent_connection_gets_err_timeout_and_is_closed(self) -> None:
        proto, transport = self.connect()
        self.clock.advance(HealthProtocol.timeOut + 0.5)
        assert transport.value() == b"ERR timeout\n"
        assert transport.disconnecting
        assert transport.producer is None

    def test_trickling_partial_line_still_times_out(self) -> None:
        proto, transport = self.connect()
        step = HealthProtocol.timeOut / 4
        for byte in [b"P", b"I", b"N"]:
            self.clock.advance(step)
            proto.dataReceived(byte)
        assert not transport.disconnecting
        self.clock.advance(step + 0.5)
        assert transport.value() == b"ERR timeout\n"
        assert transport.disconnecting

    def test_client_sending_whole_lines_is_not_dropped(self) -> None:
        proto, transport = self.connect()
        step = HealthProtocol.timeOut * 0.9
        for _ in range(5):
            self.clock.advance(step)
            assert self.exchange(proto, transport, b"HEARTBEAT\n") == b"OK\n"
        # Well past timeOut since the connection was made.
        assert self.clock.seconds() > 4 * HealthProtocol.timeOut
        assert not transport.disconnecting

    def test_timeout_counts_from_the_last_whole_line(self) -> None:
        proto, transport = self.connect()
        self.clock.advance(HealthProtocol.timeOut - 1)
        self.exchange(proto, transport, b"PING\n")
        transport.clear()
        self.clock.advance(HealthProtocol.timeOut - 1)
        assert not transport.disconnecting
        self.clock.advance(2)
        assert transport.value() == b"ERR timeout\n"
        assert transport.disconnecting

    def test_invalid_utf8_line_counts_as_a_whole_line(self) -> None:
        proto, transport = self.connect()
        self.clock.advance(HealthProtocol.timeOut - 1)
        self.exchange(proto, transport, b"\xff\n")
        self.clock.advance(HealthProtocol.timeOut - 1)
        assert not transport.disconnecting

    def test_timeout_can_be_overridden_on_the_class(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(HealthProtocol, "timeOut", 2.0)
        proto, transport = self.connect()
        self.clock.advance(2.5)
        assert transport.value() == b"ERR timeout\n"

    def test_connection_lost_cancels_the_timeout(self) -> None:
        proto, transport = self.connect()
        assert len(self.clock.getDelayedCalls()) == 1
        proto.connectionLost(Failure(ConnectionDone()))
        assert self.clock.getDelayedCalls() == []


class HalfCloseTests(HealthProtocolTestsMixin):
    """A client that shuts its write side still gets its replies."""

    def test_protocol_declares_half_close_support(self) -> None:
        # Without it the transport closes both ways at the client's EOF.
        proto, transport = self.connect()
        assert IHalfCloseableProtocol.providedBy(proto)

    def test_half_closed_client_gets_its_replies_then_the_connection_closes(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"PING\nSTATUS\n")
        proto.readConnectionLost()
        lines = transport.value().split(b"\n")
        assert lines[0] == b"PONG hyperdb-mcp 9.8.7"
        assert json.loads(lines[1]) == STATUS
        assert lines[2:] == [b""]
        assert transport.disconnecting
        # A real transport finishes closing only once the producer is gone.
        assert transport.producer is None

    def test_a_closing_client_that_does_not_read_is_cut_off(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"STATUS\n")
        proto.readConnectionLost()
        self.clock.advance(HealthProtocol.closeGrace - 0.1)
        assert not transport.disconnected
        self.clock.advance(0.2)
        assert transport.disconnected  # aborted, not waiting to flush
        assert self.clock.getDelayedCalls() == []

    def test_write_side_lost_closes_the_connection(self) -> None:
        proto, transport = self.connect()
        proto.writeConnectionLost()
        assert transport.disconnecting

    def test_no_timeout_reply_follows_a_half_close(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"PING\n")
        proto.readConnectionLost()
        transport.clear()
        self.clock.advance(HealthProtocol.timeOut + 1)
        assert transport.value() == b""


class ReadThrottleTests(HealthProtocolTestsMixin):
    """A client that does not read its replies stops being read."""

    def test_a_streaming_producer_is_registered_on_connect(self) -> None:
        proto, transport = self.connect()
        assert IPushProducer.providedBy(transport.producer)
        assert transport.streaming

    def test_producer_pauses_and_resumes_reading_the_transport(self) -> None:
        proto, transport = self.connect()
        transport.producer.pauseProducing()
        assert transport.producerState == "paused"
        transport.producer.resumeProducing()
        assert transport.producerState == "producing"


class HealthFactoryTests:
    def test_build_protocol_makes_a_health_protocol_per_connection(self) -> None:
        factory = HealthFactory(FakeTarget(), FakeAuthorizer(True))
        address = IPv4Address("TCP", "127.0.0.1", 50000)
        first = factory.buildProtocol(address)
        second = factory.buildProtocol(address)
        assert isinstance(first, HealthProtocol)
        assert first is not second
        assert first.factory is factory

    def test_factory_protocols_serve_the_factory_target(self) -> None:
        target = FakeTarget()
        factory = HealthFactory(target, FakeAuthorizer(True))
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        clock = Clock()
        proto.callLater = clock.callLater
        transport = StringTransport()
        proto.makeConnection(transport)
        try:
            proto.dataReceived(b"STOP\n")
            assert transport.value() == b"STOPPING\n"
            assert "stop" in target.calls
        finally:
            proto.connectionLost(Failure(ConnectionDone()))


class SessionCommandTests(HealthProtocolTestsMixin):
    """SESSION, READY and BYE; replies that wait keep the order of commands."""

    def test_session_answers_ok_with_the_facts(self) -> None:
        proto, transport = self.connect()
        reply = self.exchange(proto, transport, b'SESSION {"pid": 42}\n')
        assert reply == b'OK {"id":"s1","hyperd_endpoint":"h:1"}\n'
        assert proto.session_id == "s1"

    def test_session_with_bad_json_or_fields_is_an_error(self) -> None:
        proto, transport = self.connect()
        assert self.exchange(proto, transport, b"SESSION {nope\n").startswith(b"ERR ")
        assert self.exchange(proto, transport, b"SESSION [1]\n").startswith(b"ERR ")
        assert self.exchange(proto, transport, b"SESSION {}\n") == b"ERR SESSION needs pid\n"
        assert proto.session_id is None
        assert not transport.disconnecting

    def test_one_session_per_connection(self) -> None:
        proto, transport = self.connect()
        self.exchange(proto, transport, b'SESSION {"pid": 1}\n')
        assert self.exchange(proto, transport, b'SESSION {"pid": 1}\n').startswith(b"ERR ")

    def test_a_session_connection_has_no_idle_timeout(self) -> None:
        proto, transport = self.connect()
        self.exchange(proto, transport, b'SESSION {"pid": 1}\n')
        self.clock.advance(HealthProtocol.timeOut * 10)
        assert not transport.disconnecting

    def test_dropped_session_connection_ends_the_session_uncleanly(self) -> None:
        proto, transport = self.connect()
        self.exchange(proto, transport, b'SESSION {"pid": 1}\n')
        proto.connectionLost(Failure(ConnectionDone()))
        assert "end s1 clean=False" in self.target.calls

    def test_bye_ends_the_session_cleanly(self) -> None:
        proto, transport = self.connect()
        self.exchange(proto, transport, b'SESSION {"pid": 1}\n')
        assert self.exchange(proto, transport, b"BYE\n") == b"OK\n"
        assert "end s1 clean=True" in self.target.calls
        proto.connectionLost(Failure(ConnectionDone()))
        assert [c for c in self.target.calls if c.startswith("end")] == ["end s1 clean=True"]

    def test_a_waiting_reply_holds_later_commands_in_order(self) -> None:
        proto, transport = self.connect()
        self.target.ready = Deferred()
        assert self.exchange(proto, transport, b"READY\nPING\nHEARTBEAT\n") == b""
        transport.clear()
        self.target.ready.callback({"hyperd_endpoint": "h:2"})
        assert transport.value() == b'OK {"hyperd_endpoint":"h:2"}\nPONG hyperdb-mcp 9.8.7\nOK\n'

    def test_a_connection_times_out_again_after_a_waiting_reply(self) -> None:
        proto, transport = self.connect()
        self.target.ready = Deferred()
        self.exchange(proto, transport, b"READY\n")
        self.clock.advance(HealthProtocol.timeOut * 2)  # no timeout while it waits
        assert not transport.disconnecting
        self.target.ready.callback({"hyperd_endpoint": "h:2"})
        transport.clear()
        self.clock.advance(HealthProtocol.timeOut + 1)
        assert transport.value() == b"ERR timeout\n"
        assert transport.disconnecting

    def test_a_connection_times_out_again_after_bye(self) -> None:
        proto, transport = self.connect()
        self.exchange(proto, transport, b'SESSION {"pid": 1}\nBYE\n')
        transport.clear()
        self.clock.advance(HealthProtocol.timeOut + 1)
        assert transport.value() == b"ERR timeout\n"

    def test_a_failed_wait_answers_err(self) -> None:
        proto, transport = self.connect()
        self.target.ready = Deferred()
        self.exchange(proto, transport, b"READY\n")
        transport.clear()
        self.target.ready.errback(Exception("the daemon is stopping"))
        assert transport.value() == b"ERR the daemon is stopping\n"

    def test_connection_lost_while_session_waits_ends_it(self) -> None:
        proto, transport = self.connect()
        self.target.ready = Deferred()
        self.exchange(proto, transport, b'SESSION {"pid": 1}\n')
        proto.connectionLost(Failure(ConnectionDone()))
        assert "end s1 clean=False" in self.target.calls
        self.target.ready.callback({"hyperd_endpoint": "h:2"})  # must not raise

    def test_refused_peer_cannot_open_a_session(self) -> None:
        proto, transport = self.connect(allowed=False)
        assert self.exchange(proto, transport, b'SESSION {"pid": 1}\n') == b"ERR forbidden\n"
        assert self.target.calls == []


class NamingTarget(FakeTarget):
    """A L{FakeTarget} that also records C{NAME}."""

    def rename_session(self, session_id: str, name: str | None) -> None:
        self.calls.append(f"rename {session_id} {name}")


class NameCommandTests(HealthProtocolTestsMixin):
    """NAME relabels the connection's session; bad input changes nothing."""

    def connect(self, allowed: bool = True) -> tuple[HealthProtocol, StringTransport]:
        self.clock = Clock()
        self.target = NamingTarget()
        self.authorize = FakeAuthorizer(allowed)
        self.factory = HealthFactory(self.target, self.authorize)
        return self.open_connection()

    def renames(self) -> list[str]:
        return [call for call in self.target.calls if call.startswith("rename")]

    def test_name_relabels_the_connections_session(self) -> None:
        proto, transport = self.connect()
        self.exchange(proto, transport, b'SESSION {"pid": 1, "name": "hyperdb-mcp"}\n')
        assert self.exchange(proto, transport, b'NAME {"name": "claude-code"}\n') == b"OK\n"
        assert self.exchange(proto, transport, 'NAME {"name": "東京 ✓"}\n'.encode()) == b"OK\n"
        assert self.exchange(proto, transport, b'NAME {"name": null}\n') == b"OK\n"
        assert self.renames() == ["rename s1 claude-code", "rename s1 東京 ✓", "rename s1 None"]

    def test_name_without_a_session_is_an_error(self) -> None:
        proto, transport = self.connect()
        assert (self.exchange(proto, transport, b'NAME {"name": "x"}\n')
                == b"ERR NAME needs a session on this connection: send SESSION first\n")
        self.exchange(proto, transport, b'SESSION {"pid": 1}\n')
        self.exchange(proto, transport, b"BYE\n")
        assert (self.exchange(proto, transport, b'NAME {"name": "x"}\n')
                .startswith(b"ERR NAME needs a session"))
        assert self.renames() == []
        assert not transport.disconnecting

    def test_a_name_of_the_wrong_type_or_too_long_is_an_error(self) -> None:
        proto, transport = self.connect()
        self.exchange(proto, transport, b'SESSION {"pid": 1}\n')
        too_long = json.dumps({"name": "x" * 201}).encode()
        for line in (b'NAME {"name": 42}', b'NAME {"name": ["a"]}', b'NAME {"name": {}}',
                     b"NAME " + too_long):
            assert (self.exchange(proto, transport, line + b"\n")
                    == b'ERR "name" must be a string of at most 200 characters\n'), line
        for line in (b"NAME", b"NAME {nope", b'NAME ["x"]', b'NAME {"label": "x"}',
                     b'NAME "x"'):
            assert (self.exchange(proto, transport, line + b"\n")
                    == b'ERR NAME takes a JSON object with "name"\n'), line
        assert self.renames() == []
        # Exactly 200 characters is fine; the connection was usable all along.
        assert self.exchange(
            proto, transport, b"NAME " + json.dumps({"name": "y" * 200}).encode() + b"\n"
        ) == b"OK\n"
        assert self.renames() == ["rename s1 " + "y" * 200]
