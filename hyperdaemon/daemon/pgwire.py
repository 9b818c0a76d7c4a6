"""
The daemon's own small PostgreSQL-protocol client, for the few queries it
sends C{hyperd} itself: the health probe and dropping a finished session's
database.

It speaks protocol 3.0 on the reactor: startup, authentication (none,
cleartext or SCRAM-SHA-256, which C{hyperd} asks for), then simple queries
one at a time.  Loading psycopg for this would add a quarter to the daemon's
memory (libpq, OpenSSL, its adapters) and a worker thread per query; clients,
which run real workloads, keep using psycopg.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import struct
from collections import deque
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

PROTOCOL_VERSION = 196608  # 3.0
_HEADER = struct.Struct("!cI")
_INT32 = struct.Struct("!I")
_INT16 = struct.Struct("!H")

#: Authentication request codes (the 'R' message).
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

#: A server message larger than this breaks the connection: ours are tiny.
MAX_MESSAGE = 1 << 20

Row = tuple["str | None", ...]


class PGError(Exception):
    """
    The server refused something (an C{ErrorResponse}), or broke the
    protocol.  C{sqlstate} is the server's error code when it sent one.
    """

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@functools.lru_cache(maxsize=4)
def pbkdf2_sha256(password: bytes, salt: bytes, iterations: int) -> bytes:
    """
    PBKDF2-HMAC-SHA256 with a 32-byte result (RFC 8018), as SCRAM needs.

    C{hashlib.pbkdf2_hmac} needs OpenSSL from Python 3.12 on, and the daemon
    does not load it; this keys the two HMAC hash states once and copies
    them, so an iteration is four calls into the hash.  It still takes a few
    milliseconds of the reactor thread, and a C{hyperd} salts its user's
    password once: the result is kept (RFC 5802 lets a client cache it), so
    only the first connection to each C{hyperd} pays.
    """
    key = password if len(password) <= 64 else hashlib.sha256(password).digest()
    key = key.ljust(64, b"\x00")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def prf(message: bytes) -> bytes:
        i = inner.copy()
        i.update(message)
        o = outer.copy()
        o.update(i.digest())
        return o.digest()

    u = prf(salt + b"\x00\x00\x00\x01")
    result = int.from_bytes(u, "big")
    for _ in range(iterations - 1):
        u = prf(u)
        result ^= int.from_bytes(u, "big")
    return result.to_bytes(32, "big")


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


class ScramClient:
    """
    The client side of one SCRAM-SHA-256 exchange (RFC 5802, RFC 7677),
    without channel binding.  PostgreSQL takes the user name from the
    startup message, so C{user} stays empty, as libpq sends it.
    """

    mechanism = b"SCRAM-SHA-256"

    def __init__(self, password: str, nonce: str | None = None, user: str = "") -> None:
        self._password = password.encode("utf-8")
        self._nonce = nonce if nonce is not None else base64.b64encode(os.urandom(18)).decode()
        self._first_bare = f"n={user},r={self._nonce}"
        self._salted: bytes | None = None
        self._auth_message: bytes | None = None
        #: Whether the server has proven that it knows the password.
        self.verified = False

    def first_message(self) -> bytes:
        return f"n,,{self._first_bare}".encode("ascii")

    def final_message(self, server_first: bytes) -> bytes:
        """
        Our proof, for the server's first message.

        @raise PGError: if that message is malformed or does not extend our
            nonce.
        """
        try:
            text = server_first.decode("ascii")
            fields = dict(part.split("=", 1) for part in text.split(","))
            nonce = fields["r"]
            salt = base64.b64decode(fields["s"], validate=True)
            iterations = int(fields["i"])
        except (ValueError, KeyError):
            raise PGError("malformed SCRAM challenge from the server") from None
        if not nonce.startswith(self._nonce) or not 0 < iterations <= 1_000_000:
            raise PGError("invalid SCRAM challenge from the server")
        self._salted = pbkdf2_sha256(self._password, salt, iterations)
        without_proof = f"c=biws,r={nonce}"
        self._auth_message = f"{self._first_bare},{text},{without_proof}".encode("ascii")
        client_key = _hmac(self._salted, b"Client Key")
        signature = _hmac(hashlib.sha256(client_key).digest(), self._auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode("ascii")

    def verify(self, server_final: bytes) -> None:
        """
        Check the server's signature, so that a listener which does not know
        the password cannot pass for C{hyperd}.

        @raise PGError: if it does not match.
        """
        if self._salted is None or self._auth_message is None:
            raise PGError("SCRAM outcome before its challenge")
        expected = _hmac(_hmac(self._salted, b"Server Key"), self._auth_message)
        text = server_final.decode("ascii", "replace")
        if not text.startswith("v="):
            raise PGError(f"the server refused the SCRAM proof ({text})")
        try:
            received = base64.b64decode(text[2:].split(",", 1)[0], validate=True)
        except ValueError:
            raise PGError("malformed SCRAM signature from the server") from None
        if not hmac.compare_digest(received, expected):
            raise PGError("the server's SCRAM signature does not match")
        self.verified = True


def _cstring(text: str) -> bytes:
    return text.encode("utf-8") + b"\x00"


def _message(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload) + 4) + payload


def _error_fields(payload: bytes) -> PGError:
    fields: dict[str, str] = {}
    for field in payload.split(b"\x00"):
        if field:
            fields[chr(field[0])] = field[1:].decode("utf-8", "replace")
    return PGError(fields.get("M", "unknown server error"), fields.get("C"))


class PGClientProtocol(Protocol):
    """
    One connection.  C{ready} fires with the protocol once it is
    authenticated and idle, or fails; L{query} runs one simple query after
    the ones before it.
    """

    def __init__(self, user: str, password: str | None) -> None:
        self._user = user
        self._password = password
        self._buffer = bytearray()
        self._scram: ScramClient | None = None
        self.ready: defer.Deferred[PGClientProtocol] = defer.Deferred(lambda _: self._abort())
        self._queue: deque[tuple[bytes, defer.Deferred[list[Row]]]] = deque()
        self._current: defer.Deferred[list[Row]] | None = None
        self._rows: list[Row] = []
        self._error: PGError | None = None
        self.closed = False

    # -- Twisted hooks --------------------------------------------------------

    def connectionMade(self) -> None:
        body = _INT32.pack(PROTOCOL_VERSION) + _cstring("user") + _cstring(self._user) + b"\x00"
        self.transport.write(_INT32.pack(len(body) + 4) + body)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 5:
            kind, length = _HEADER.unpack_from(self._buffer)
            if length < 4 or length > MAX_MESSAGE:
                self._fail(PGError(f"bad message length {length} from the server"))
                return
            if len(self._buffer) < length + 1:
                return
            payload = bytes(self._buffer[5:length + 1])
            del self._buffer[:length + 1]
            try:
                self._handle(kind, payload)
            except PGError as e:
                self._fail(e)
                return
            except (struct.error, ValueError):
                self._fail(PGError(f"malformed {kind!r} message from the server"))
                return
            if self.closed:
                return

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        error = PGError(f"connection to hyperd lost: {reason.getErrorMessage()}")
        pending = [self.ready, self._current, *(d for _, d in self._queue)]
        self._queue.clear()
        self._current = None
        for d in pending:
            if d is not None and not d.called:
                d.errback(error)

    # -- public ----------------------------------------------------------------

    def query(self, sql: str) -> defer.Deferred[list[Row]]:
        """
        Run C{sql} (one statement, simple protocol).  Fires with its rows,
        each a tuple of text values or C{None}; fails with L{PGError}.
        """
        d: defer.Deferred[list[Row]] = defer.Deferred(self._cancel_query)
        if self.closed:
            d.errback(PGError("the connection to hyperd is closed"))
            return d
        self._queue.append((_message(b"Q", _cstring(sql)), d))
        self._next()
        return d

    def close(self) -> None:
        """Say goodbye and close; pending queries fail."""
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.write(_message(b"X", b""))
            self.transport.loseConnection()

    # -- internals -------------------------------------------------------------

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abortConnection()

    def _cancel_query(self, d: defer.Deferred[list[Row]]) -> None:
        if d is self._current:
            # Its answer would still come: the connection is out of step.
            self._current = None
            self._abort()
        else:
            self._queue = deque(item for item in self._queue if item[1] is not d)

    def _fail(self, error: PGError) -> None:
        failed = self.ready if not self.ready.called else self._current
        self._current = None
        if failed is not None and not failed.called:
            failed.errback(error)
        self._abort()

    def _next(self) -> None:
        if self._current is None and self._queue and self.ready.called:
            message, self._current = self._queue.popleft()
            self._rows, self._error = [], None
            self.transport.write(message)

    def _handle(self, kind: bytes, payload: bytes) -> None:
        if kind == b"R":
            self._authenticate(payload)
        elif kind == b"Z":
            self._idle()
        elif kind == b"E":
            error = _error_fields(payload)
            if not self.ready.called or self._current is None:
                raise error
            self._error = error
        elif kind == b"D":
            self._rows.append(self._data_row(payload))
        # ParameterStatus, BackendKeyData, RowDescription, CommandComplete,
        # notices and the like carry nothing the daemon uses.

    def _idle(self) -> None:
        if not self.ready.called:
            self.ready.callback(self)
        elif self._current is not None:
            current, self._current = self._current, None
            if self._error is not None:
                current.errback(self._error)
            else:
                current.callback(self._rows)
        self._next()

    @staticmethod
    def _data_row(payload: bytes) -> Row:
        (count,) = _INT16.unpack_from(payload)
        values: list[str | None] = []
        offset = 2
        for _ in range(count):
            (size,) = _INT32.unpack_from(payload, offset)
            offset += 4
            if size == 0xFFFFFFFF:
                values.append(None)
            else:
                values.append(payload[offset:offset + size].decode("utf-8", "replace"))
                offset += size
        return tuple(values)

    def _authenticate(self, payload: bytes) -> None:
        (code,) = _INT32.unpack_from(payload)
        if code == AUTH_OK:
            if self._scram is not None and not self._scram.verified:
                raise PGError("the server skipped the last step of SCRAM")
            return
        if self._password is None and code in (AUTH_CLEARTEXT, AUTH_SASL):
            raise PGError("hyperd asks for a password and none is known")
        if code == AUTH_CLEARTEXT:
            self.transport.write(_message(b"p", _cstring(self._password or "")))
        elif code == AUTH_SASL:
            mechanisms = payload[4:].split(b"\x00")
            if ScramClient.mechanism not in mechanisms:
                raise PGError("hyperd offers no SASL mechanism this client knows")
            self._scram = ScramClient(self._password or "")
            first = self._scram.first_message()
            body = ScramClient.mechanism + b"\x00" + _INT32.pack(len(first)) + first
            self.transport.write(_message(b"p", body))
        elif code == AUTH_SASL_CONTINUE and self._scram is not None:
            self.transport.write(_message(b"p", self._scram.final_message(payload[4:])))
        elif code == AUTH_SASL_FINAL and self._scram is not None:
            self._scram.verify(payload[4:])
        else:
            raise PGError(f"unsupported authentication request {code} from the server")


def connect(
    reactor: Any, host: str, port: int, user: str, password: str | None, timeout: float,
) -> defer.Deferred[PGClientProtocol]:
    """
    Connect and authenticate within C{timeout} seconds.  Fires with the
    ready connection; fails with L{PGError} if the server refuses,
    L{defer.TimeoutError} if it takes longer, or a connection error.
    """
    protocol = PGClientProtocol(user, password)
    d = TCP4ClientEndpoint(reactor, host, port).connect(_Quiet(protocol))
    d.addCallback(lambda _: protocol.ready)
    d.addTimeout(timeout, reactor, onTimeoutCancel=_timed_out)
    return d


class _Quiet(ClientFactory):
    """Builds the one protocol, without logging each connection."""

    noisy = False

    def __init__(self, protocol: PGClientProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> PGClientProtocol:
        return self._protocol


def _timed_out(result: Any, timeout: float) -> Any:
    # Cancelling a connection attempt fails it with ConnectingCancelledError,
    # which Deferred.addTimeout does not turn into a TimeoutError itself.
    if isinstance(result, Failure) and result.check(defer.CancelledError,
                                                    ConnectingCancelledError):
        raise defer.TimeoutError(f"hyperd did not answer within {timeout:g} s")
    return result
