"""
C{hyperdb-mcp} without a subcommand: the launcher each assistant starts.

It serves nothing itself: it connects to the user's MCP host
(L{hyperdaemon.mcp.host}) on C{$HYPERDB_STATE_DIR/mcp-host.sock}, sends one
line of settings (its flags, the environment variables that matter, its pid
and cwd), reads the host's one-line answer, and then relays its stdin to the
host and the host's output to its stdout, unchanged.  When stdin ends it
tells the host (a half-close) and exits once the host has closed the
session; SIGTERM and SIGINT do the same.

The warm path (a host answers) imports only the standard library, so that
an assistant's server costs a few megabytes and starts in milliseconds: its
entry point (L{main}) reads its flags without argparse, and it sends its
settings before it imports json, so that the host opens the session while
the launcher loads the rest (see the imports).  The
cold path (no host answers) finds or spawns the daemon as clients always did
(asking it to start its host with C{hyperd}), asks for the host
(C{MCP_HOST}) and waits for it.  Where no host can serve (C{--no-daemon},
the upstream daemon, a host that cannot start, one that says it is not the
daemon the settings choose) the launcher runs today's in-process server
(L{hyperdaemon.mcp.server.run}) instead.

Recovery: if the host goes away while stdin is open (it or the daemon died),
every request in flight is answered with a JSON-RPC error that says to call
again, the launcher connects again (spawning the daemon if need be), replays
the client's C{initialize} request and C{initialized} notification to the
new host (swallowing the reply), and goes on relaying.  It never exits
because of it.
"""

import os
import select
import sys
import time

# The warm path takes the C modules under socket and signal (whose Python
# wrappers load enum and selectors), and writes its settings line without
# the json package (which loads re): together these cost about as much as
# the host's opening of the session, so json is imported once the settings
# are sent (L{handshake}), while the host works.
import _signal as signal
import _socket as socket
from _json import encode_basestring_ascii

#: The host's socket in the state directory (the daemon's and the host's too).
SOCKET_NAME = "mcp-host.sock"
#: The variables a launcher passes on (the host keeps no others).
PASSED_VARIABLES = ("HYPERDB_STATE_DIR", "HYPERDB_DAEMON_PORT", "HYPERDB_DAEMON_PORT_RANGE",
                    "HYPERDB_PERSISTENT_DB", "HYPERD_PATH", "HOME", "XDG_DATA_HOME")
#: Set in a spawned daemon's environment: start the host first (L{hyperdaemon.daemon.hoststart}).
START_VAR = "HYPERDAEMON_MCP_HOST"
#: Set in a launcher that started afresh after its cold start (see L{reach_host}).
FRESH_VAR = "HYPERDAEMON_LAUNCHER_FRESH"
#: Seconds the host may take to answer the settings (it opens the session).
ANSWER_TIMEOUT = 120.0
#: Seconds between attempts to reach a host again after one went away.
RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
#: The JSON-RPC error code of a request the host could not finish.
RETRY_CODE = -32000
RETRY_MESSAGE = ("The hyperdb-mcp server restarted while this request was running, so it "
                 "may not have completed; check its effect if it writes, then send it again.")
PROG = "hyperdb-mcp"


class NoHost(Exception):
    """No host can serve this launcher; the in-process server should."""


class Refused(Exception):
    """The host refused the session for a reason the user must fix (C{str()})."""


class Stop(BaseException):
    """SIGTERM or SIGINT came while the launcher was busy: end the session, exit."""


def _stop(signum, frame) -> None:
    raise Stop()


def finish(sock: socket.socket, timeout: float = 30.0) -> int:
    """
    End the session: shut our side down, and wait (at most C{timeout}
    seconds) for the host to close it, which it does once the session is
    closed and its scratch database dropped.  The exit code.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(timeout)
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass
    sock.close()
    return 0


def state_dir(environ) -> str:
    """The state directory, as L{hyperdaemon.config.state_dir} resolves it without a flag."""
    raw = environ.get("HYPERDB_STATE_DIR", "").strip() and environ["HYPERDB_STATE_DIR"]
    if not raw:
        raw = os.path.join("~", ".hyperdb")
    if raw == "~" or raw.startswith("~/"):
        home = environ.get("HOME") or os.path.expanduser("~")
        if not home or home == "~":
            raise NoHost("no home directory")
        raw = home + raw[1:]
    return os.path.abspath(raw)


def persistent_db(options, environ) -> "str | None":
    """
    The persistent database, absolute (resolved here, against the
    launcher's cwd and home, as L{hyperdaemon.client.session} would);
    C{None} with C{--ephemeral-only}.
    """
    if options.get("ephemeral_only"):
        return None
    given = options.get("persistent_db") or environ.get("HYPERDB_PERSISTENT_DB", "").strip()
    if given:
        return os.path.abspath(os.path.expanduser(given))
    data = environ.get("XDG_DATA_HOME", "").strip()
    if not data or not os.path.isabs(data):  # the XDG spec ignores relative paths
        data = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "hyperdb", "workspace.hyper")


def json_text(value) -> str:
    """
    C{value} (C{None}, a bool, an int, a string, or a dict of them by
    strings) as compact JSON, as C{json.dumps(value, separators=(",", ":"))}
    writes it, without importing the json package.
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return str(value)
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return "{" + ",".join(f"{encode_basestring_ascii(key)}:{json_text(item)}"
                              for key, item in value.items()) + "}"
    raise TypeError(f"the settings line holds no {type(value).__name__}")


def settings_line(options, environ, ephemeral_db: "str | None" = None) -> bytes:
    fields = {
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "read_only": bool(options.get("read_only")),
        "ephemeral_only": bool(options.get("ephemeral_only")),
        "persistent_db": persistent_db(options, environ),
        "environ": {name: environ[name] for name in PASSED_VARIABLES if name in environ},
    }
    if ephemeral_db is not None:
        fields["ephemeral_db"] = ephemeral_db
    return json_text(fields).encode("utf-8") + b"\n"


def peer_is_own_user(sock: socket.socket) -> bool:
    """
    Whether this user's process listens at the other end of C{sock}
    (C{SO_PEERCRED}); C{True} where the kernel cannot tell.
    """
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    creds = sock.getsockopt(socket.SOL_SOCKET, option, 12)  # struct ucred: pid, uid, gid
    return int.from_bytes(creds[4:8], sys.byteorder) == os.getuid()


def connect(path: str) -> "socket.socket | None":
    """
    A connection to the host's socket, or C{None} if nobody answers there,
    or another user does: the settings and the session are only for a
    host of this user.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        if peer_is_own_user(sock):
            return sock
    except OSError:
        pass
    sock.close()
    return None


def handshake(sock: socket.socket, line: bytes) -> "tuple[dict, bytes]":
    """
    Send the settings, read the host's answer.

    @return: the answer, and what came after it (the start of the MCP stream).
    @raise NoHost: if the host cannot serve (or went away).
    @raise Refused: if it refused the session for the user to fix.
    """
    sock.settimeout(ANSWER_TIMEOUT)
    try:
        sock.sendall(line)
        import json  # while the host opens the session (see the imports above)

        data = b""
        while b"\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise NoHost("the host closed the connection")
            data += chunk
    except OSError as e:
        raise NoHost(str(e)) from None
    finally:
        sock.settimeout(None)
    answer, _, rest = data.partition(b"\n")
    try:
        fields = json.loads(answer)
    except ValueError:
        raise NoHost("the host's answer is not JSON") from None
    if not isinstance(fields, dict) or fields.get("ok") is not True:
        reason = str(fields.get("error", "no reason given")) if isinstance(fields, dict) else ""
        if isinstance(fields, dict) and fields.get("fallback") is False:
            raise Refused(reason)
        raise NoHost(reason)
    return fields, rest


def check_settings(options, environ) -> None:
    """
    What a session checks before it looks for a daemon (the state
    directory, the persistent database, room for the session's folder), so
    that a setting the user must fix starts nothing.

    @raise NoHost: if one is wrong: the in-process server says which, as
        it always did, and exits.
    """
    import tempfile
    from pathlib import Path

    from hyperdaemon.config import ConfigError, check_persistent_db
    from hyperdaemon.discovery import SESSIONS_NAME, StateDirError, prepare_state_dir

    try:
        state = Path(state_dir(environ))
        prepare_state_dir(state)
        persistent = persistent_db(options, environ)
        if persistent is not None:
            check_persistent_db(Path(persistent))
        os.rmdir(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=state / SESSIONS_NAME))
    except (ConfigError, StateDirError, OSError) as e:
        raise NoHost(str(e)) from None


def cold_start(options, environ) -> str:
    """
    Find or spawn the daemon (asking for the host with C{hyperd}), ask it
    for its host, and return the host's socket once it accepts launchers.

    @raise NoHost: if the daemon cannot give one (upstream's, or its host
        cannot start), or no daemon can be had (the in-process server then
        says why).
    """
    import json

    from hyperdaemon.client.finder import DaemonUnavailable, Finder
    from hyperdaemon.client.healthclient import DaemonError, connect_own

    check_settings(options, environ)
    try:
        finder = Finder.from_environment(None, None, dict(environ, **{START_VAR: "1"}))
        address = finder.ensure()
    except (DaemonUnavailable, DaemonError) as e:
        raise NoHost(str(e)) from None
    except Exception as e:  # whatever it is, the in-process server says it plainly
        raise NoHost(f"{type(e).__name__}: {e}") from None
    if address.session_protocol is None:
        raise NoHost("the daemon has no MCP host (the upstream daemon)")
    try:
        with connect_own(address.port, timeout=ANSWER_TIMEOUT) as conn:
            reply = conn.ask("MCP_HOST")
    except (OSError, DaemonError) as e:
        raise NoHost(str(e)) from None
    if not reply.startswith("OK "):
        raise NoHost(reply)
    try:
        return str(json.loads(reply[3:])["socket"])
    except (ValueError, KeyError, TypeError):
        raise NoHost(f"unusable answer to MCP_HOST: {reply}") from None


def reach_host(options, environ, ephemeral_db: "str | None" = None,
               start_afresh: bool = False) -> "tuple[socket.socket, dict, bytes]":
    """
    A connection to a host that has opened this launcher's session (with
    C{ephemeral_db}, its scratch database in a host that died, if given),
    the host's answer, and the first bytes of its MCP stream.

    With C{start_afresh}, a launcher that had to take the cold path (which
    imports Twisted and more) runs itself again in the same process
    (C{exec}, same pid, nothing read from stdin yet) once the host
    answers, so that it lives on with the standard library only.

    @raise NoHost: if none can be had.
    @raise Refused: if the host refused the session for the user to fix.
    """
    line = settings_line(options, environ, ephemeral_db)
    own = os.path.join(state_dir(environ), SOCKET_NAME)
    sock = connect(own)
    if sock is None:
        path = cold_start(options, environ)
        if start_afresh and path == own and os.environ.get(FRESH_VAR) != "1":
            os.environ[FRESH_VAR] = "1"  # once: the next start is warm, or stays here
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, sys.orig_argv)
        sock = connect(path)
        if sock is None:
            raise NoHost("the host's socket does not answer")
    try:
        return (sock, *handshake(sock, line))
    except Stop:
        finish(sock)
        raise
    except BaseException:
        sock.close()
        raise


class Lines:
    """
    Cuts a byte stream into lines, keeping the pieces of an unfinished line
    apart until its end comes: a 64 MB message is joined once, not copied
    again with each piece.
    """

    def __init__(self) -> None:
        self._parts: list = []
        #: Bytes of the unfinished line.
        self.pending = 0

    def feed(self, data: bytes) -> list:
        """The lines that C{data} completes, without their ends."""
        if b"\n" not in data:
            if data:
                self._parts.append(data)
                self.pending += len(data)
            return []
        first, *rest = data.split(b"\n")
        tail = rest.pop()
        lines = [b"".join([*self._parts, first]), *rest]
        self._parts = [tail] if tail else []
        self.pending = len(tail)
        return lines


#: A client's line longer than this is read by its ends (L{request_head}) where it can be.
PARSE_LIMIT = 65536
#: How clients begin a request: the id first (the Python SDK), or the method first.
_ID_FIRST = b'{"jsonrpc":"2.0","id":'
_METHOD_FIRST = (b'{"jsonrpc":"2.0","method":', b'{"method":')


def _value_at(line: bytes, start: int) -> "tuple[object, int] | None":
    """The JSON string or number at C{start} of C{line}, and where it ends; None if not one."""
    import json

    # One character per byte, so that where the value ends is where its bytes
    # do; the value itself must be ASCII for that (what follows may be anything).
    text = line[start:start + 256].decode("latin-1")
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, str))
            or not text[:end].isascii()):
        return None
    return value, start + end


def request_head(line: bytes) -> "tuple[str, object] | None":
    """
    The method and id of a client's request, read from the line's two ends,
    never parsing what lies between (a load_data's megabytes of rows, which
    the launcher would otherwise hold as Python objects): for a request that
    begins C{{"jsonrpc":"2.0","id":<id>,"method":"<m>"}, or one that begins
    with its method and ends C{"id":<id>}}.  None when the ends do not say
    for sure: the caller parses the line.
    """
    if line.startswith(_ID_FIRST):
        found = _value_at(line, len(_ID_FIRST))
        if found is None:
            return None
        request_id, end = found
        key = b',"method":'
        if line[end:end + len(key)] != key:
            return None
        method = _value_at(line, end + len(key))
        return (method[0], request_id) if method and isinstance(method[0], str) else None
    for prefix in _METHOD_FIRST:
        if line.startswith(prefix):
            method = _value_at(line, len(prefix))
            break
    else:
        return None
    if method is None or not isinstance(method[0], str):
        return None
    tail = line.rstrip()
    at = tail.rfind(b',"id":', max(0, len(tail) - 300))
    if at < 0:
        return None
    found = _value_at(tail, at + len(b',"id":'))
    # The id's value, then the object's one closing brace: a top-level member.
    if found is None or tail[found[1]:] != b"}":
        return None
    return method[0], found[0]


#: How the host (the SDK's models, in field order) begins a line with an id.
_WITH_ID = b'{"jsonrpc":"2.0","id":'
#: L{answered_id}'s word for a line that answers nothing (a request from the host).
NOT_AN_ANSWER = object()


def answered_id(line: bytes) -> object:
    """
    The id that a line from the host answers, read from its first bytes
    only: a result (a query's rows, the tools' list) is never parsed, nor
    copied.  L{NOT_AN_ANSWER} for a request the host sends; C{None} when the
    line does not begin as the host writes one, for the caller to parse.
    """
    if not line.startswith(_WITH_ID):
        return NOT_AN_ANSWER if line.startswith(b'{"jsonrpc":"2.0","method":') else None
    found = _value_at(line, len(_WITH_ID))
    if found is None:  # not an id, or one longer than what is read of it
        return None
    after = line[found[1]:found[1] + 10]
    if after.startswith((b',"result":', b',"error":')):
        return found[0]
    if after.startswith(b',"method":'):
        return NOT_AN_ANSWER
    return None


class Relay:
    """
    Copies stdin to the host and the host to stdout, unchanged, and keeps
    what recovery needs: the client's C{initialize} request and
    C{initialized} notification, and the ids of the requests in flight.
    """

    def __init__(self, sock: socket.socket, answer: dict, first: bytes, options,
                 environ) -> None:
        self.sock = sock
        #: The session's scratch database, for a new host to attach again.
        self.ephemeral_db = answer.get("ephemeral_db")
        self._options = options
        self._environ = environ
        self._to_stdout = first
        self._from_stdin = Lines()
        self._from_host = Lines()
        self.initialize: "bytes | None" = None
        self.initialized: "bytes | None" = None
        self.in_flight: dict = {}
        self._swallow: object = None
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def _signalled(self, signum, frame) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # -- what passes -----------------------------------------------------------

    def _note_from_client(self, line: bytes) -> None:
        import json

        if len(line) > PARSE_LIMIT:
            head = request_head(line)
            if head is not None:  # a long request: its id, without parsing its data
                self.in_flight[json.dumps(head[1])] = head[1]
                return
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        method = message.get("method")
        if method == "initialize":
            self.initialize = line
        elif method == "notifications/initialized":
            self.initialized = line
        if method is not None and "id" in message:
            self.in_flight[json.dumps(message["id"])] = message["id"]

    def _from_host_line(self, line: bytes) -> bool:
        """Note a line from the host; whether it goes to stdout."""
        import json

        found = answered_id(line)
        if found is None:
            try:
                message = json.loads(line)
            except ValueError:
                return True
            if not (isinstance(message, dict) and "method" not in message and "id" in message):
                return True
            found = message["id"]
        elif found is NOT_AN_ANSWER:
            return True
        key = json.dumps(found)
        if self._swallow is not None and key == self._swallow:
            self._swallow = None
            return False
        self.in_flight.pop(key, None)
        return True

    def _write_stdout(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(1, view)
            view = view[written:]

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._signalled)
        stdin_open = True
        self._host_data(b"")
        while True:
            if self._stop:
                return self._finish()
            readers = [self.sock, self._wake_r] + ([0] if stdin_open else [])
            try:
                ready, _, _ = select.select(readers, [], [])
            except InterruptedError:
                continue
            if self._wake_r in ready:
                os.read(self._wake_r, 64)
                continue
            if 0 in ready:
                data = os.read(0, 1 << 16)
                if not data:
                    stdin_open = False
                    try:
                        self.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                else:
                    self._client_data(data)
            if self.sock in ready:
                try:
                    data = self.sock.recv(1 << 16)
                except OSError:
                    data = b""
                if data:
                    self._host_data(data)
                elif not stdin_open:
                    return 0  # the host closed the session after our stdin ended
                else:
                    self._recover()

    def _client_data(self, data: bytes) -> None:
        for line in self._from_stdin.feed(data):
            if line.strip():
                self._note_from_client(line)
        try:
            self.sock.sendall(data)
        except OSError:
            pass  # the host is gone: the read side sees it and recovers

    def _host_data(self, data: bytes) -> None:
        lines = self._from_host.feed(self._to_stdout + data)
        self._to_stdout = b""
        out = [line + b"\n" for line in lines if self._from_host_line(line)]
        if out:
            self._write_stdout(b"".join(out))

    def _finish(self) -> int:
        """SIGTERM or SIGINT: the host closes the session; then exit."""
        return finish(self.sock)

    # -- recovery ----------------------------------------------------------------

    def _recover(self) -> None:
        """The host went away: answer what was in flight, reach a host again, replay."""
        import json

        self.sock.close()
        self._from_host = Lines()
        answers = b"".join(
            json.dumps({"jsonrpc": "2.0", "id": request_id,
                        "error": {"code": RETRY_CODE, "message": RETRY_MESSAGE}},
                       separators=(",", ":")).encode() + b"\n"
            for request_id in self.in_flight.values())
        self.in_flight.clear()
        if answers:
            self._write_stdout(answers)
        print(f"{PROG}: the MCP host went away; connecting again", file=sys.stderr)
        attempt = 0
        # A signal now ends the wait at once (reaching a host may take long).
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _stop)
        try:
            while not self._stop:
                try:
                    sock, answer, first = reach_host(self._options, self._environ,
                                                     self.ephemeral_db)
                    break
                except (NoHost, Refused) as e:
                    delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
                    if attempt == 3:
                        print(f"{PROG}: still no MCP host ({e}); trying again",
                              file=sys.stderr)
                    attempt += 1
                    time.sleep(delay)
            else:
                self.sock = socket.socket()
                return
        except Stop:
            self._stop = True
            self.sock = socket.socket()
            return
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._signalled)
        self.sock = sock
        self.ephemeral_db = answer.get("ephemeral_db") or self.ephemeral_db
        replay = b""
        if self.initialize is not None:
            try:
                self._swallow = json.dumps(json.loads(self.initialize)["id"])
            except (ValueError, KeyError, TypeError):
                self._swallow = None
            replay += self.initialize + b"\n"
        if self.initialized is not None:
            replay += self.initialized + b"\n"
        try:
            sock.sendall(replay)
        except OSError:
            pass
        self._to_stdout = first
        self._host_data(b"")


def _in_process(options) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)  # the server handles them once it runs
    from hyperdaemon.mcp.server import run

    return run(options)


#: The launcher's switches (C{hyperdaemon.cli}'s top-level flags), by their option names.
SWITCHES = {"--no-daemon": "no_daemon", "--ephemeral-only": "ephemeral_only",
            "--read-only": "read_only"}
#: Its one flag with a value.
VALUED = "--persistent-db"


def launcher_options(argv) -> "dict | None":
    """
    The options of a command line that only starts the launcher, as
    L{hyperdaemon.cli}'s parser gives them; C{None} for any other (a
    subcommand, C{--help}, an abbreviation, a mistake), which that parser
    reads, so that it answers as it always did.
    """
    options = {"no_daemon": False, "persistent_db": None, "ephemeral_only": False,
               "read_only": False, "command": None}
    args = iter(argv)
    for arg in args:
        if arg in SWITCHES:
            options[SWITCHES[arg]] = True
        elif arg == VALUED:
            value = next(args, None)
            if value is None or value.startswith("-"):
                return None
            options["persistent_db"] = value
        elif arg.startswith(VALUED + "="):
            options["persistent_db"] = arg[len(VALUED) + 1:]
        else:
            return None
    return options


def main(argv=None) -> int:
    """
    C{hyperdb-mcp}: the launcher, reached without importing the command
    line's parser (argparse and what it loads cost more than the rest of
    the warm start); every other command goes to L{hyperdaemon.cli.main}.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    options = launcher_options(argv)
    if options is None:
        # A daemon spawned for a launcher starts its MCP host first thing.
        from hyperdaemon.daemon.hoststart import start_for_daemon

        early = start_for_daemon(argv, os.environ)
        from hyperdaemon.cli import main as command_line

        return command_line(argv, early_host=early)
    return launch(options)


def launch(options) -> int:
    """Serve MCP on stdio through the host, or in this process where none can; the exit code."""
    if options.get("no_daemon"):
        return _in_process(options)
    environ = dict(os.environ)
    # Until the relay runs, a signal ends the session where it stands.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    relay = None
    try:
        try:
            sock, answer, first = reach_host(options, environ, start_afresh=True)
        except NoHost:
            return _in_process(options)
        except Refused as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 1
        relay = Relay(sock, answer, first, options, environ)
        return relay.run()
    except Stop:
        return finish(relay.sock) if relay is not None else 0
