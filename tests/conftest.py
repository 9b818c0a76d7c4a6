"""
Test-session safety nets.

Every process the tests start inherits a marker variable; when the session
ends, any such process still alive (a daemon, a hyperd, twistd) fails the
run and is killed.  The daemon's variables are pointed away from the user's
real state and ports, so that a test that forgets to pass its own can never
touch ~/.hyperdb, the user's persistent database, or 7485-7500.
"""

from __future__ import annotations

import os
import uuid

import pytest

from support import MARKER, leaked_processes, kill_processes

os.environ[MARKER] = uuid.uuid4().hex
os.environ.pop("HYPERDB_DAEMON_PORT", None)
os.environ.pop("HYPERD_PATH", None)
os.environ.pop("HYPERDB_DAEMON_IDLE_TIMEOUT", None)


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
    if leaked:
        kill_processes(leaked)
        pytest.fail(
            "processes started by the tests were still running at the end:\n"
            + "\n".join(f"  {pid}: {cmd}" for pid, cmd in leaked.items())
        )
