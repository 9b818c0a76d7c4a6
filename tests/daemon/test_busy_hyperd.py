"""
A busy or briefly stopped C{hyperd} is left alone; a hung one is stopped
gracefully (its data written out) before it is replaced; an idle daemon
checks C{hyperd} when a session arrives.  The real daemon process and the
real C{hyperd}, with the supervisor's probe tunables shortened (the daemon is
started through a launcher that sets them, as tests set them in-process).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from support import QUICK, DaemonProcess, ask, hyperd_query, pid_alive, status, wait_for

#: Probes every 0.3 s that give up after 1 s: the old supervisor killed
#: hyperd after one such timeout.
FAST_PROBES = {"probe_interval": 0.3, "probe_timeout": 1.0}
#: Short enough for a test, long enough that a briefly stopped hyperd
#: (test_briefly_stopped...) is not taken for hung.
HUNG_AFTER = 2.0

#: One query that keeps hyperd's worker threads busy for seconds; six at once
#: make a probe wait for seconds (measured on two cores: 3 to 4 s).
HEAVY = ("SELECT sum(y) FROM (SELECT a.x * b.x + random() AS y "
         "FROM generate_series(1, 60000) a(x), generate_series(1, 10000) b(x) "
         "ORDER BY y DESC) t")
HEAVY_COUNT = 6


def connect(facts: dict[str, Any]) -> Any:
    """A libpq connection to the hyperd that C{facts} (STATUS, a SESSION reply) names."""
    import psycopg

    host, _, port = facts["hyperd_endpoint"].rpartition(":")
    return psycopg.connect(host=host, port=int(port), user=facts["hyperd_user"],
                           password=facts["hyperd_password"], autocommit=True,
                           connect_timeout=5)


class TunedDaemon(DaemonProcess):
    """The daemon, its L{HyperdSupervisor} tunables set to C{tunables} first."""

    def __init__(self, state_dir: Path, tunables: dict[str, float], *extra: str) -> None:
        super().__init__(state_dir, None, "--idle-timeout", "0", *extra)
        settings = "\n".join(f"HyperdSupervisor.{name} = {value!r}"
                             for name, value in tunables.items())
        launcher = ("import sys\n"
                    "from hyperdaemon.daemon.supervisor import HyperdSupervisor\n"
                    f"{settings}\n"
                    "from hyperdaemon.cli import main\n"
                    "sys.exit(main(sys.argv[1:]))\n")
        # [python, -m, hyperdaemon, daemon, --port, N, ...] -> [python, -c, launcher, daemon, ...]
        self.args = [sys.executable, "-c", launcher, *self.args[3:]]

    def log(self) -> str:
        path = self.state_dir / "logs" / "daemon.log"
        return path.read_text() if path.exists() else ""


class BusyHyperdTestCase:
    @pytest.fixture(autouse=True)
    def _world(self, tmp_path: Path, daemons: list[DaemonProcess]) -> Iterator[None]:
        """
        After the test (before its daemons are killed): its connections
        closed, its query threads joined, its sessions' sockets closed, and
        its hyperds continued, whatever the test did to them.
        """
        self.tmp = tmp_path
        self._daemons = daemons
        self.hyperds: list[int] = []
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.connections: list[Any] = []
        yield
        for conn in reversed(self.connections):
            conn.close()
        for thread in self.threads:
            thread.join(120)
        for s in reversed(self.sockets):
            s.close()
        for pid in self.hyperds:
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)

    def start_daemon(self, **tunables: float) -> tuple[TunedDaemon, dict[str, Any]]:
        daemon = TunedDaemon(self.tmp / "state", {**FAST_PROBES, **tunables}).start()
        self._daemons.append(daemon)
        facts = daemon.wait_ready()
        self.hyperds.append(facts["hyperd_pid"])
        return daemon, facts

    def session(self, daemon: DaemonProcess) -> tuple[socket.socket, Any]:
        """A connection carrying a session (so that hyperd is watched)."""
        s = socket.create_connection(("127.0.0.1", daemon.port), timeout=60)
        self.sockets.append(s)
        f = s.makefile("rwb")
        reply = self.send(f, "SESSION " + json.dumps({"pid": os.getpid(), "name": "busy test",
                                                      "ephemeral_db": None}))
        assert reply.startswith("OK "), reply
        return s, f

    def send(self, f: Any, line: str) -> str:
        f.write(line.encode() + b"\n")
        f.flush()
        return f.readline().decode().rstrip("\n")

    def heavy_queries(self, facts: dict[str, Any]) -> tuple[list[threading.Thread], list[Any]]:
        """L{HEAVY_COUNT} heavy queries on their own connections, running."""
        results: list[Any] = []

        def run() -> None:
            try:
                results.append(hyperd_query(facts, HEAVY))
            except Exception as e:  # the test reports it
                results.append(e)

        threads = [threading.Thread(target=run) for _ in range(HEAVY_COUNT)]
        for thread in threads:
            thread.start()
        self.threads.extend(threads)
        return threads, results

    def assert_all_succeeded(self, threads: list[threading.Thread], results: list[Any]) -> None:
        for thread in threads:
            thread.join(120)
        assert len(results) == HEAVY_COUNT
        for result in results:
            assert isinstance(result, float)

    def assert_same_hyperd(self, daemon: DaemonProcess, facts: dict[str, Any]) -> None:
        now = status(daemon.port)
        assert ((now["state"], now["hyperd_pid"], now["restarts"])
                == ("ready", facts["hyperd_pid"], 0))
        assert hyperd_query(now) == 2


class BusyHyperdTests(BusyHyperdTestCase):
    def test_briefly_stopped_hyperd_with_a_session_is_kept(self) -> None:
        daemon, facts = self.start_daemon(hung_after=60.0)
        self.session(daemon)
        pid = facts["hyperd_pid"]
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: f"hyperd[{pid}] is stopped" in daemon.log(), QUICK,
                 "the daemon to see hyperd stopped")
        # Stopped through several probe intervals, longer than a probe's timeout.
        time.sleep(3 * FAST_PROBES["probe_timeout"])
        os.kill(pid, signal.SIGCONT)
        wait_for(lambda: f"hyperd[{pid}] answers again" in daemon.log(), QUICK,
                 "the daemon to see hyperd answer again")
        self.assert_same_hyperd(daemon, facts)
        assert "starting a new hyperd" not in daemon.log()

    def test_busy_hyperd_with_a_session_is_kept_and_its_queries_succeed(self) -> None:
        # A hung limit far shorter than the queries: only the busy-ness of
        # hyperd keeps it.
        daemon, facts = self.start_daemon(hung_after=HUNG_AFTER)
        self.session(daemon)
        threads, results = self.heavy_queries(facts)
        self.assert_all_succeeded(threads, results)
        pid = facts["hyperd_pid"]
        assert f"hyperd[{pid}] is busy" in daemon.log()  # its probes did time out
        self.assert_same_hyperd(daemon, facts)
        assert "starting a new hyperd" not in daemon.log()

    def test_reported_error_on_a_busy_hyperd_keeps_it(self) -> None:
        daemon, facts = self.start_daemon(hung_after=HUNG_AFTER)  # no session: unwatched
        pid = facts["hyperd_pid"]
        threads, results = self.heavy_queries(facts)
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=60) as s:
            f = s.makefile("rwb")
            # Report until one report's probe has met the busy hyperd.
            while f"hyperd[{pid}] is busy" not in daemon.log() and any(
                    t.is_alive() for t in threads):
                assert self.send(f, "REPORT_HYPERD_ERROR") == "OK"
                ready = json.loads(self.send(f, "READY")[3:])
                assert ready["hyperd_endpoint"] == facts["hyperd_endpoint"]
        assert f"hyperd[{pid}] is busy" in daemon.log()
        self.assert_all_succeeded(threads, results)
        self.assert_same_hyperd(daemon, facts)

    def test_hung_hyperd_is_stopped_gracefully_before_its_replacement(self) -> None:
        daemon, old = self.start_daemon(hung_after=HUNG_AFTER)
        self.session(daemon)
        # A table only a graceful stop writes out: the file stays attached.
        db = self.tmp / "kept.hyper"
        conn = connect(old)
        self.connections.append(conn)
        conn.execute(f'CREATE DATABASE "{db}"')
        conn.execute(f'ATTACH DATABASE "{db}" AS kept')
        conn.execute("CREATE TABLE kept.public.t AS SELECT * FROM generate_series(1, 1000) g(x)")
        os.kill(old["hyperd_pid"], signal.SIGSTOP)
        new = wait_for(
            lambda: (lambda f: f if f["state"] == "ready" and f["hyperd_pid"] != old["hyperd_pid"]
                     else None)(status(daemon.port)),
            60, "a replacement for the hung hyperd",
        )
        assert new["restarts"] == 1
        assert not pid_alive(old["hyperd_pid"])
        log = daemon.log()
        assert f"hyperd[{old['hyperd_pid']}] stopped: exited with code 0" in log
        assert "killing it" not in log
        with connect(new) as c:
            c.execute(f'ATTACH DATABASE "{db}" AS kept')
            assert c.execute("SELECT count(*) FROM kept.public.t").fetchone()[0] == 1000

    def test_idle_daemon_replaces_a_stopped_hyperd_when_a_session_arrives(self) -> None:
        daemon, old = self.start_daemon(hung_after=HUNG_AFTER)
        os.kill(old["hyperd_pid"], signal.SIGSTOP)
        # The quiet period: no session, so no probe, for longer than the hung limit.
        time.sleep(HUNG_AFTER)
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=60) as s:
            reply = self.send(s.makefile("rwb"), "SESSION " + json.dumps(
                {"pid": os.getpid(), "name": "late", "ephemeral_db": None}))
            took = time.monotonic() - started
            assert reply.startswith("OK "), reply
            facts = json.loads(reply[3:])
            assert facts["hyperd_endpoint"] != old["hyperd_endpoint"]
            assert hyperd_query(facts) == 2
        assert took < 5.0  # the old path: about 10 s, client timeouts included
        assert f"hyperd[{old['hyperd_pid']}] stopped: exited with code 0" in daemon.log()

    def test_hung_hyperd_reported_by_a_client_is_replaced(self) -> None:
        daemon, old = self.start_daemon(hung_after=HUNG_AFTER)
        os.kill(old["hyperd_pid"], signal.SIGSTOP)
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=60) as s:
            f = s.makefile("rwb")
            assert self.send(f, "REPORT_HYPERD_ERROR") == "OK"
            # READY waits for a usable hyperd: the replacement, once the old
            # one has shown no sign of life for the hung limit.
            ready = json.loads(self.send(f, "READY")[3:])
        assert ready["hyperd_endpoint"] != old["hyperd_endpoint"]
        assert hyperd_query(ready) == 2
        assert status(daemon.port)["restarts"] == 1
        assert not pid_alive(old["hyperd_pid"])
        wait_for(lambda: daemon.record()["hyperd_endpoint"] == ready["hyperd_endpoint"],
                 QUICK, "daemon.json to name the new hyperd")

    def test_stop_lets_a_stopped_hyperd_exit_gracefully(self) -> None:
        # A grace period the test would time out on: no SIGKILL may be needed.
        daemon, facts = self.start_daemon(stop_grace=120.0)
        os.kill(facts["hyperd_pid"], signal.SIGSTOP)
        assert ask(daemon.port, "STOP") == ["STOPPING"]
        assert daemon.wait_exit(QUICK) == 0
        assert not pid_alive(facts["hyperd_pid"])
        assert f"hyperd[{facts['hyperd_pid']}] stopped: exited with code 0" in daemon.log()
