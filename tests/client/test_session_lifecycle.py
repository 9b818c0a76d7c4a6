"""
How a session ends: a program that never closes it still exits, and a close
during a long statement is prompt and leaves nothing behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from support import QUICK, READY_TIMEOUT, Clients, until, wait_for

#: Clients spawn daemons and hyperds: more time than an asynchronous test's default.
pytestmark = pytest.mark.deadline(180)

FORGETFUL = textwrap.dedent("""
    import json
    from twisted.internet import defer, task
    from hyperdaemon.client.session import Session

    async def main(reactor):
        session = await Session.open(reactor, name="forgetful")
        await session.query("SELECT 1")
        print(json.dumps({"ephemeral_db": str(session.ephemeral_db)}), flush=True)
        # No close(): the program just ends.

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
""")

#: Runs for minutes on hyperd (a cross join of 4e10 rows).
LONG_QUERY = ("SELECT count(*) FROM generate_series(1, 200000) AS x(a), "
              "generate_series(1, 200000) AS y(b) WHERE (a * 7 + b * 13) % 11 = 3")


class EndingTests:
    def test_a_program_that_never_closes_its_session_exits_and_is_cleaned_up(
            self, clients: Clients) -> None:
        started = subprocess.run([sys.executable, "-c", FORGETFUL], env=clients.env,
                                 capture_output=True, text=True, timeout=READY_TIMEOUT,
                                 stdin=subprocess.DEVNULL)
        assert started.returncode == 0, started.stderr
        folder = Path(json.loads(started.stdout)["ephemeral_db"]).parent
        # The daemon saw the connection drop without BYE and cleans up.
        wait_for(lambda: not folder.exists(), QUICK, "the session's folder to be removed")
        assert not folder.exists()
        assert clients.daemon_status()["sessions"] == []

    @pytest_twisted.ensureDeferred
    async def test_close_with_a_long_statement_waiting_behind_another_is_prompt(
            self, clients: Clients) -> None:
        # The long statement reaches hyperd only after the close began: a
        # single cancel, sent when the close begins, would find the short one
        # (or nothing) and the close would wait for the long one to end.
        session = await clients.open(name="busy")
        for sql in ("SELECT 1", LONG_QUERY):
            session.query(sql).addErrback(lambda _: None)
        begun = reactor.seconds()
        await session.close()
        assert reactor.seconds() - begun < QUICK
        assert not session.ephemeral_db.parent.exists()

    @pytest_twisted.ensureDeferred
    async def test_close_during_a_long_statement_is_prompt_and_leaves_nothing(
            self, clients: Clients) -> None:
        session = await clients.open(name="busy")
        running = session.query(LONG_QUERY)
        running.addErrback(lambda _: None)
        await until(lambda: session._pool.working, QUICK, "the statement to start")
        begun = reactor.seconds()
        await session.close()
        assert reactor.seconds() - begun < QUICK
        assert not session.ephemeral_db.parent.exists()
        await until(lambda: clients.daemon_status()["sessions"] == [], QUICK, "the session to end")
