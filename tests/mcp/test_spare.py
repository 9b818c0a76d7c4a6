"""
The scratch database and connection an MCP host makes ahead
(L{hyperdaemon.mcp.spare}): handing one over, clearing a dead host's, and
keeping one ready.  The keeper's tests build spares without C{hyperd} (its
hand-over with the real daemon and C{hyperd} is in test_host.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from hyperdaemon.client.session import EPHEMERAL_NAME, Credentials, SpareConnection
from hyperdaemon.mcp import spare
from support import QUICK, until

CREDENTIALS = Credentials("127.0.0.1", 1234, "tableau_internal_user", "secret")


class Connection:
    """A connection's stand-in: closed or not, readable when its server hung up."""

    def __init__(self) -> None:
        self.closed = False
        self._r, self._w = os.pipe()

    def fileno(self) -> int:
        return self._r

    def hang_up(self) -> None:
        os.write(self._w, b"x")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._r)
            os.close(self._w)


def a_spare(root: Path, pid: int = os.getpid()) -> spare.Spare:
    folder = root / f"{pid}{spare.SPARE_MARK}abc"
    folder.mkdir(mode=0o700)
    (folder / EPHEMERAL_NAME).write_bytes(b"made ahead")
    return spare.Spare(folder, SpareConnection(Connection(), CREDENTIALS))


def test_a_spare_moves_into_a_new_folder_named_for_its_launcher(tmp_path: Path) -> None:
    made = a_spare(tmp_path)
    path = spare.hand_over(made, 4242)
    assert path.name == EPHEMERAL_NAME and path.read_bytes() == b"made ahead"
    assert path.parent.parent == tmp_path and path.parent.name.startswith("4242-")
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert not made.folder.exists()
    assert not made.connection.connection.closed  # the session's now


def test_a_spare_that_cannot_move_is_discarded(tmp_path: Path) -> None:
    made = a_spare(tmp_path)
    (made.folder / EPHEMERAL_NAME).unlink()
    with pytest.raises(OSError):
        spare.hand_over(made, 4242)
    assert made.connection.connection.closed
    assert list(tmp_path.iterdir()) == []


def test_only_the_spares_of_dead_hosts_are_cleared(tmp_path: Path) -> None:
    for name in ("100-spare-a", "200-spare-b", "100-session", "junk-spare-c"):
        (tmp_path / name).mkdir()
    spare.clear_stale(tmp_path, is_alive=lambda pid: pid == 200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["100-session", "200-spare-b",
                                                          "junk-spare-c"]


def test_a_connection_made_ahead_is_used_only_if_sound_and_for_the_same_hyperd() -> None:
    sound = SpareConnection(Connection(), CREDENTIALS)
    assert sound.take(CREDENTIALS) is sound.connection
    other = Credentials("127.0.0.1", 1235, "tableau_internal_user", "secret")
    moved = SpareConnection(Connection(), CREDENTIALS)
    assert moved.take(other) is None and moved.connection.closed
    hung_up = SpareConnection(Connection(), CREDENTIALS)
    hung_up.connection.hang_up()
    assert hung_up.take(CREDENTIALS) is None and hung_up.connection.closed
    sound.connection.close()


class Builds:
    """A keeper's build: counts its calls; fails while told to."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0
        self.fail = False

    def __call__(self) -> spare.Spare:
        self.count += 1
        if self.fail:
            raise OSError("hyperd is not there")
        return a_spare(self.root, pid=1000 + self.count)


@pytest_twisted.ensureDeferred
async def test_the_keeper_makes_one_hands_it_over_and_makes_the_next(tmp_path: Path) -> None:
    builds = Builds(tmp_path)
    keeper = spare.SpareKeeper(reactor, builds)
    try:
        assert keeper.take(1) is None  # none made yet
        keeper.replenish()
        keeper.replenish()  # one at a time
        await until(lambda: keeper.ready, QUICK, "a spare")
        assert builds.count == 1
        path, connection = keeper.take(4242)
        assert path.parent.name.startswith("4242-") and path.exists()
        assert keeper.take(4243) is None  # the next one comes a moment later
        await until(lambda: keeper.ready, QUICK, "the next spare")
        assert builds.count == 2
        connection.close()
    finally:
        keeper.stop()
    assert [p.name.startswith("4242-") for p in tmp_path.iterdir()] == [True]


@pytest_twisted.ensureDeferred
async def test_a_stopped_keeper_discards_its_spare_and_makes_no_more(tmp_path: Path) -> None:
    builds = Builds(tmp_path)
    keeper = spare.SpareKeeper(reactor, builds)
    keeper.replenish()
    await until(lambda: keeper.ready, QUICK, "a spare")
    made = next(tmp_path.iterdir())
    keeper.stop()
    assert not made.exists() and not keeper.ready
    keeper.replenish()
    assert builds.count == 1 and keeper.take(1) is None


@pytest_twisted.ensureDeferred
async def test_a_failed_build_leaves_the_keeper_able_to_try_again(tmp_path: Path) -> None:
    builds = Builds(tmp_path)
    builds.fail = True
    keeper = spare.SpareKeeper(reactor, builds)
    try:
        keeper.replenish()
        await until(lambda: builds.count == 1 and not keeper._making, QUICK, "the failure")
        assert not keeper.ready
        builds.fail = False
        # The next launcher finds none, and has another made.
        assert keeper.take(4242) is None
        await until(lambda: keeper.ready, QUICK, "a spare")
        assert builds.count == 2
    finally:
        keeper.stop()
