"""
Test-session safety nets, and the one reactor of the run.

pytest-twisted runs one reactor (Twisted's default) for the whole session:
it is never restarted between tests, so its signal handlers, and with them
the reaping of child processes, stay as they are in production.  Asynchronous
tests and fixtures go through C{pytest_twisted.ensureDeferred} (or
C{inlineCallbacks} and C{async_yield_fixture}); each such test is bounded in
time (L{ASYNC_TEST_TIMEOUT}, or C{@pytest.mark.deadline(seconds)}).

After every test, L{clean_reactor} fails it if it left delayed calls,
selectables (listening ports, connections, process pipes) or child processes
of the reactor behind, as trial's dirty-reactor check did.

Every process the tests start inherits a marker variable; when the session
ends, any such process still alive (a daemon, a hyperd, twistd) fails the
run and is killed.  The daemon's variables are pointed away from the user's
real state and ports, so that a test that forgets to pass its own can never
touch ~/.hyperdb, the user's persistent database, or 7485-7500.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, interfaces
from twisted.internet.task import deferLater

from support import (
    MARKER,
    Clients,
    DaemonProcess,
    kill_processes,
    leaked_processes,
    pid_alive,
    within,
)

os.environ[MARKER] = uuid.uuid4().hex
os.environ.pop("HYPERDB_DAEMON_PORT", None)
os.environ.pop("HYPERD_PATH", None)
os.environ.pop("HYPERDB_DAEMON_IDLE_TIMEOUT", None)

#: How long an asynchronous test may run, unless it is marked otherwise (as
#: trial's default timeout was).
ASYNC_TEST_TIMEOUT = 120.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deadline(seconds): an asynchronous test fails if it is still running after this "
        f"many seconds (default {ASYNC_TEST_TIMEOUT:g})",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Bound every asynchronous test in time (it can wait for a reactor event forever)."""
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            marker = item.get_closest_marker("deadline")
            seconds = float(marker.args[0]) if marker else ASYNC_TEST_TIMEOUT
            item.obj = _bounded(item.obj, seconds, item.name)


def _bounded(test: Any, seconds: float, name: str) -> Any:
    @functools.wraps(test)
    async def bounded(**kwargs: Any) -> Any:
        return await within(
            defer.ensureDeferred(test(**kwargs)), seconds,
            f"{name} was still running after {seconds:g} s "
            "(if it needs longer, mark it with @pytest.mark.deadline)")

    return pytest_twisted.ensureDeferred(bounded)


@pytest.fixture(scope="session", autouse=True)
def running_reactor() -> None:
    """
    Start the session's reactor before the first test, with its signal
    handlers, but for SIGTERM: that still ends the test run at once.
    """
    from twisted.internet import reactor

    on_sigterm = signal.getsignal(signal.SIGTERM)
    pytest_twisted.blockon(deferLater(reactor, 0, lambda: None))
    signal.signal(signal.SIGTERM, on_sigterm)


@pytest.fixture(autouse=True)
def clean_reactor(running_reactor: None) -> Iterator[None]:
    """
    Fail a test that leaves delayed calls, selectables (listening ports,
    connections, process pipes) or child processes of the reactor behind;
    what it left is cancelled, removed or killed, so that the next test starts
    clean.
    """
    from twisted.internet import reactor

    before = _reactor_contents(reactor)
    yield
    left = _left_behind(reactor, before)
    if any(left.values()):
        # What is due now runs first, as trial's check let it: a closed
        # connection leaves the reactor on its next turn.
        for _ in range(2):
            pytest_twisted.blockon(deferLater(reactor, 0, lambda: None))
        left = _left_behind(reactor, before)
    if not any(left.values()):
        return
    what = "; ".join(f"{kind}: {', '.join(map(repr, things))}"
                     for kind, things in left.items() if things)
    for call in left["delayed calls"]:
        call.cancel()
    for selectable in left["selectables"]:
        reactor.removeReader(selectable)
        reactor.removeWriter(selectable)
    for process in left["processes"]:
        process.signalProcess("KILL")
    pytest.fail("the test left the reactor dirty (await what it starts, or end it in a "
                f"fixture): {what}", pytrace=False)


def _reactor_contents(reactor: Any) -> dict[str, set[Any]]:
    from twisted.internet.process import reapProcessHandlers

    return {
        "delayed calls": {call for call in reactor.getDelayedCalls() if call.active()},
        "selectables": set(reactor.getReaders()) | set(reactor.getWriters()),
        "processes": {process for process in reapProcessHandlers.values()
                      if interfaces.IProcessTransport.providedBy(process)},
    }


def _left_behind(reactor: Any, before: dict[str, set[Any]]) -> dict[str, set[Any]]:
    return {kind: things - before[kind] for kind, things in _reactor_contents(reactor).items()}


@pytest_twisted.async_yield_fixture
async def clients(tmp_path: Path) -> AsyncIterator[Clients]:
    """
    The test's own clients' world (state directory, ports, environment);
    its sessions are closed, its client programs and its daemon stopped at
    the end.
    """
    world = Clients.at(tmp_path)
    yield world
    await world.end()


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """The test's daemon processes: each one added is killed, with its hyperd, at the end."""
    added: list[DaemonProcess] = []
    yield added
    for daemon in reversed(added):
        daemon.kill()


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], None]]:
    """
    Mounts a tmpfs, with the given mount options, on a folder (made if need
    be); each is unmounted at the end, lazily (whatever still uses it).
    """
    mounted: list[Path] = []

    def mount(path: Path, options: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
        mounted.append(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def _leaked_hosts(base: Path) -> dict[int, str]:
    """
    MCP host processes still serving a state directory of this test run,
    marked or not: a host outlives nothing it should (its daemon stops it,
    and it exits when the daemon's pipe closes), so one found here leaked.
    """
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [part.decode("utf-8", "replace") for part in f.read().split(b"\0")]
        except OSError:
            continue
        if "hyperdaemon.mcp.host" not in argv or "--state-dir" not in argv[:-1]:
            continue
        where = Path(argv[argv.index("--state-dir") + 1])
        # Only this run's: other runs (other pytest sessions) have their own.
        if where.is_relative_to(base) and pid_alive(int(entry)):
            found[int(entry)] = " ".join(argv).strip()
    return found


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes(tmp_path_factory: pytest.TempPathFactory):
    """Fail the run if a process started by the tests outlives them."""
    base = tmp_path_factory.getbasetemp()
    os.environ["HYPERDB_STATE_DIR"] = str(base / "default-state")
    os.environ["HYPERDB_PERSISTENT_DB"] = str(base / "default-persistent.hyper")
    os.environ["XDG_DATA_HOME"] = str(base / "xdg-data")
    # A range no test uses on purpose, far from the real 7485-7500.
    os.environ["HYPERDB_DAEMON_PORT_RANGE"] = "39900-39915"
    yield
    leaked = leaked_processes(os.environ[MARKER], grace=10.0)
    leaked.update(_leaked_hosts(base))
    if leaked:
        kill_processes(leaked)
        pytest.fail(
            "processes started by the tests were still running at the end:\n"
            + "\n".join(f"  {pid}: {cmd}" for pid, cmd in leaked.items())
        )
