"""
Helpers for tests that run the real daemon and the real hyperd.

Waiting is always for a condition with a bound (L{wait_for}); nothing here
sleeps and hopes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs

MARKER = "HYPERDAEMON_TEST_SESSION"
RESERVED_PORTS = range(7485, 7501)
#: Bound for a daemon (and its hyperd) to become ready.
READY_TIMEOUT = 60.0
#: Bound for anything that should happen "at once".
QUICK = 15.0


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll C{predicate} until it returns something true; fail after C{timeout}."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A port nothing listens on now, never one of the daemon's real range."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def within(running: Any, seconds: float, message: str) -> Any:
    """
    A Deferred with C{running}'s result, or an C{AssertionError} with
    C{message} once C{seconds} have passed.  Then C{running} is cancelled but
    not waited for: work that ignores its cancellation cannot hang the run.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    outcome: Deferred[Any] = Deferred()

    def too_late() -> None:
        outcome.errback(AssertionError(message))
        running.cancel()

    timer = reactor.callLater(seconds, too_late)

    def finished(result: Any) -> None:
        if timer.active():
            timer.cancel()
            if isinstance(result, Failure):
                outcome.errback(result)
            else:
                outcome.callback(result)

    running.addBoth(finished)
    return outcome


@contextlib.contextmanager
def noted(note: str) -> Iterator[None]:
    """Add C{note} to a failure inside: which case of a loop it was."""
    try:
        yield
    except BaseException as e:
        e.add_note(note)
        raise


def success_result_of(d: Any) -> Any:
    """The result C{d} already has; it fails the test if C{d} has none yet or failed."""
    from twisted.python.failure import Failure

    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError(f"{d!r} has no result yet")
    if isinstance(results[0], Failure):
        raise AssertionError(f"{d!r} failed:\n{results[0].getTraceback()}")
    return results[0]


def failure_result_of(d: Any, *kinds: type[BaseException]) -> Any:
    """
    The failure C{d} already has (a L{Failure}), of one of C{kinds} if any
    are given; it fails the test if C{d} has no result yet or succeeded.
    """
    from twisted.python.failure import Failure

    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError(f"{d!r} has no result yet")
    failure = results[0]
    if not isinstance(failure, Failure):
        raise AssertionError(f"{d!r} succeeded with {failure!r}")
    if kinds and not failure.check(*kinds):
        raise AssertionError(f"{d!r} failed with {failure.type.__name__}, not one of "
                             f"{[kind.__name__ for kind in kinds]}:\n{failure.getTraceback()}")
    return failure


def assert_no_result(d: Any) -> None:
    """C{d} has no result yet (and is left as it is)."""
    results: list[Any] = []

    def seen(result: Any) -> Any:
        results.append(result)
        return result

    d.addBoth(seen)
    if results:
        raise AssertionError(f"{d!r} already has a result: {results[0]!r}")


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """L{wait_for} for asynchronous tests: waits without blocking the reactor."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while not (value := predicate()):
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)
    return value


def client_environment(tmp_path: Path, ports: int = 3) -> tuple[Path, range, dict[str, str]]:
    """
    A client's world for one test: its state folder, a free port range, and
    an environment pointing the daemon, the clients and the persistent
    database there.
    """
    state = tmp_path / "state"
    first, last = free_range(ports)
    env = dict(
        os.environ, HYPERDB_STATE_DIR=str(state),
        HYPERDB_DAEMON_PORT_RANGE=f"{first}-{last}",
        HYPERDB_PERSISTENT_DB=str(tmp_path / "persistent.hyper"),
    )
    return state, range(first, last + 1), env


#: The client program that L{Clients} runs.
CLIENT = Path(__file__).with_name("client_program.py")


@attrs.define
class Clients:
    """
    One test's world of clients (the C{clients} fixture): its folder, state
    directory, free port range and environment, and the sessions and client
    programs it started, which L{end} ends.
    """

    tmp: Path
    state: Path
    ports: range
    env: dict[str, str]
    _enders: list[Callable[[], Any]] = attrs.Factory(list)

    @classmethod
    def at(cls, tmp_path: Path) -> "Clients":
        state, ports, env = client_environment(tmp_path)
        return cls(tmp_path, state, ports, env)

    async def open(self, **kwargs: Any) -> Any:
        """A L{hyperdaemon.client.session.Session} in this world, closed at the end."""
        from twisted.internet import reactor

        from hyperdaemon.client.session import Session

        session = await Session.open(reactor, environ=self.env, **kwargs)
        self._enders.append(session.close)
        return session

    def run_client(self, *args: str) -> dict[str, Any]:
        """Run the client program to its end (blocking); the facts it printed."""
        result = subprocess.run(
            [sys.executable, str(CLIENT), *args], env=self.env, capture_output=True,
            text=True, timeout=READY_TIMEOUT, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def hold_client(self, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        """
        Start the client program holding its session (blocking until it
        has one); it is killed at the end if it still runs.
        """
        proc = subprocess.Popen(
            [sys.executable, str(CLIENT), "--hold", *args], env=self.env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

        def end() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(QUICK)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()

        self._enders.append(end)
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        return proc, json.loads(line)

    def daemon_status(self) -> dict[str, Any]:
        for port in self.ports:
            try:
                return status(port)
            except OSError:
                continue
        raise AssertionError("no daemon answers in the test's range")

    async def end(self) -> None:
        """
        Close the sessions and end the client programs, the last started
        first (each within L{READY_TIMEOUT}), then stop the daemon; the first
        error, if any, is raised once everything was tried.
        """
        from twisted.internet.defer import maybeDeferred
        from twisted.internet.threads import deferToThread

        errors = []
        for ender in reversed(self._enders):
            try:
                await within(maybeDeferred(ender), READY_TIMEOUT,
                             f"{ender!r} did not end within {READY_TIMEOUT:g} s")
            except Exception as e:
                errors.append(e)
        await deferToThread(stop_daemon_on, self.ports)
        if errors:
            raise errors[0]


def free_range(count: int) -> tuple[int, int]:
    """C{count} consecutive ports that nothing listens on now."""
    import random

    while True:
        first = random.randrange(20000, 30000)
        ports = range(first, first + count)
        try:
            sockets = []
            for port in ports:
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return first, first + count - 1


def stop_daemon_on(ports: range | list[int]) -> None:
    """Stop (or kill) whatever daemon of ours answers on C{ports}; wait until it is gone."""
    for port in ports:
        try:
            facts = status(port)
        except (OSError, ValueError):
            continue
        try:
            ask(port, "STOP")
        except OSError:
            pass
        pid = facts.get("pid")
        if isinstance(pid, int):
            try:
                wait_for(lambda: not pid_alive(pid), QUICK, f"daemon {pid} to stop")
            except AssertionError:
                os.kill(pid, signal.SIGKILL)
        hyperd = facts.get("hyperd_pid")
        if isinstance(hyperd, int):
            try:
                wait_for(lambda: not pid_alive(hyperd), QUICK, f"hyperd {hyperd} to stop")
            except AssertionError:
                os.kill(hyperd, signal.SIGKILL)  # nothing outlives the test; it still fails
                raise


def port_is_free(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def port_is_open(port: int) -> bool:
    """Whether a daemon answers C{PING} on C{port}."""
    try:
        return ask(port, "PING", timeout=2)[0].startswith("PONG ")
    except (OSError, IndexError):
        return False


def ask(port: int, *commands: str, timeout: float = 10.0) -> list[str]:
    """Send C{commands} on one connection; their reply lines."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        f = s.makefile("rwb")
        replies = []
        for command in commands:
            f.write(command.encode("utf-8") + b"\n")
            f.flush()
            replies.append(f.readline().decode("utf-8").rstrip("\n"))
        return replies


def status(port: int) -> dict[str, Any]:
    return json.loads(ask(port, "STATUS")[0])


def pid_alive(pid: int) -> bool:
    """Whether C{pid} runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def hyperd_query(record: dict[str, Any], sql: str = "SELECT 1 + 1") -> Any:
    """Run C{sql} on the hyperd that C{record} (daemon.json or STATUS) names."""
    import psycopg

    host, _, port = record["hyperd_endpoint"].rpartition(":")
    with psycopg.connect(
        host=host, port=int(port), user=record["hyperd_user"],
        password=record["hyperd_password"], autocommit=True, connect_timeout=5,
    ) as conn:
        return conn.execute(sql).fetchone()[0]


class DaemonProcess:
    """
    A real daemon run as C{python -m hyperdaemon daemon} in a subprocess,
    with its own state directory and port.
    """

    def __init__(self, state_dir: Path, port: int | None = None, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.port = port if port is not None else free_port()
        self.env = dict(os.environ, HYPERDB_STATE_DIR=str(state_dir))
        if env:
            self.env.update(env)
        self.args = [sys.executable, "-m", "hyperdaemon", "daemon",
                     "--port", str(self.port), *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def record_path(self) -> Path:
        return self.state_dir / "daemon.json"

    def record(self) -> dict[str, Any]:
        return json.loads(self.record_path.read_text())

    def start(self) -> "DaemonProcess":
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        return self

    def output(self) -> str:
        """Everything it printed (only once it has exited)."""
        assert self.proc is not None and self.proc.stdout is not None
        return self.proc.stdout.read().decode("utf-8", "replace")

    def wait_ready(self) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode}:\n{self.output()}"
                )
            try:
                facts = status(self.port)
            except (OSError, ValueError):
                return None
            if facts.get("state") == "ready" and self.record_path.exists():
                return facts
            return None

        return wait_for(ready, READY_TIMEOUT, "the daemon and its hyperd to be ready")

    def wait_exit(self, timeout: float = QUICK) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Stop it however it can be stopped, and its hyperd with it."""
        if self.proc is None:
            return
        hyperds = children_of(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(QUICK)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(QUICK)
        for pid in hyperds:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def leaked_processes(marker: str, grace: float) -> dict[int, str]:
    """Live processes carrying the test session's marker, after a grace period."""
    needle = f"{MARKER}={marker}".encode()
    me = os.getpid()

    def scan() -> dict[int, str]:
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if needle not in f.read().split(b"\0"):
                        continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            except OSError:
                continue
            if pid_alive(pid):
                found[pid] = cmd
        return found

    deadline = time.monotonic() + grace
    found = scan()
    while found and time.monotonic() < deadline:
        time.sleep(0.05)
        found = scan()
    return found


def kill_processes(pids: dict[int, str]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def fork_reporting(serve: Callable[[int], None], uid: int | None = None) -> tuple[int, int]:
    """
    Fork a child that drops to C{uid} (if given; the tests run as root) and
    runs C{serve(report_fd)}, reporting to the test through a pipe.

    @return: the child's pid and the read end of its pipe.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            serve(write_end)
        finally:
            os._exit(1)
    os.close(write_end)
    return pid, read_end


def run_as(uid: int, work: Callable[[], str]) -> str:
    """
    Run C{work} in a forked child that has dropped to C{uid}; its result.
    A fork, not a new interpreter: the other user may not be able to read
    this Python installation.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.write(write_end, work().encode("utf-8"))
            code = 0
        except BaseException as e:
            os.write(write_end, f"child failed: {e!r}".encode("utf-8"))
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read().decode("utf-8")
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, out
    return out
