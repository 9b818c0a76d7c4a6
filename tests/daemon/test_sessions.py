"""
Unit tests for L{hyperdaemon.daemon.sessions}' file helpers: which folders are
session folders, which ephemeral database paths a client may hand the
daemon, and removing folders without ever following a symbolic link.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hyperdaemon.daemon.sessions import (
    PID_MAX,
    folder_owner,
    remove_session_folder,
    session_folder,
    sweep_orphans,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A state directory's C{sessions} folder."""
    sessions = tmp_path / "state" / "sessions"
    sessions.mkdir(parents=True)
    return sessions


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the state directory with a file worth keeping."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "scratch.hyper").write_bytes(b"precious")
    return folder


# -- folder names ----------------------------------------------------------


@pytest.mark.parametrize("name, pid", [("123-abc", 123), ("1-", 1), (f"{PID_MAX}-x", PID_MAX),
                                       ("0042-x", 42)])
def test_folder_owner_reads_an_ascii_decimal_pid(name: str, pid: int) -> None:
    assert folder_owner(name) == pid


@pytest.mark.parametrize("name", [
    "99999999999999999999-x",  # beyond any pid: OverflowError in os.kill
    f"{PID_MAX + 1}-x",
    "\u00b2-x",  # a superscript two: isdigit() but not int()
    "\u0663-x",  # an Arabic-Indic three: int() reads it, but it is no pid of ours
    "0-x",  # os.kill(0) signals our own process group
    "123",
    "-x",
    "abc-x",
    "+1-x",
    " 1-x",
    "1_000-x",
])
def test_folder_owner_refuses_any_other_name(name: str) -> None:
    assert folder_owner(name) is None


def test_sweep_ignores_stray_entries_and_removes_dead_clients_folders(
        root: Path, outside: Path) -> None:
    for name in ("99999999999999999999-x", "\u00b2-x", "notes", "555-dead", "556-alive"):
        (root / name).mkdir()
    (root / "557-file").write_bytes(b"")
    (root / "558-link").symlink_to(outside)
    sweep = sweep_orphans(root, is_alive=lambda pid: pid == 556)
    assert sweep.removed == [root / "555-dead"]
    assert sorted(sweep.ignored) == sorted(root / name for name in (
        "99999999999999999999-x", "\u00b2-x", "notes", "557-file", "558-link"))
    assert sweep.failed == []
    assert sorted(os.listdir(root)) == sorted([
        "99999999999999999999-x", "\u00b2-x", "notes", "556-alive", "557-file", "558-link"])
    assert (outside / "scratch.hyper").read_bytes() == b"precious"


def test_sweep_of_a_missing_root_does_nothing(tmp_path: Path) -> None:
    sweep = sweep_orphans(tmp_path / "absent", is_alive=lambda pid: False)
    assert (sweep.removed, sweep.ignored, sweep.failed) == ([], [], [])


# -- SESSION's ephemeral_db ------------------------------------------------


def test_a_real_folder_is_accepted_before_its_database_exists(root: Path) -> None:
    folder = root / "123-abc"
    folder.mkdir()
    assert session_folder(str(folder / "scratch.hyper"), root) == folder


def test_an_existing_database_file_is_accepted(root: Path) -> None:
    folder = root / "123-abc"
    folder.mkdir()
    (folder / "scratch.hyper").write_bytes(b"")
    assert session_folder(str(folder / "scratch.hyper"), root) == folder


def test_a_session_folder_that_is_a_symlink_is_refused(root: Path, outside: Path) -> None:
    (root / "123-abc").symlink_to(outside)
    with pytest.raises(ValueError, match="ephemeral_db must not lead through a symbolic link"):
        session_folder(str(root / "123-abc" / "scratch.hyper"), root)


def test_a_database_that_is_a_symlink_is_refused(root: Path, outside: Path) -> None:
    folder = root / "123-abc"
    folder.mkdir()
    (folder / "scratch.hyper").symlink_to(outside / "scratch.hyper")
    with pytest.raises(ValueError, match="symbolic link"):
        session_folder(str(folder / "scratch.hyper"), root)


def test_a_sessions_folder_that_is_a_symlink_is_refused(tmp_path: Path, outside: Path) -> None:
    (outside / "123-abc").mkdir()
    root = tmp_path / "sessions"
    root.symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        session_folder(str(root / "123-abc" / "scratch.hyper"), root)


def test_a_missing_folder_is_refused(root: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        session_folder(str(root / "123-abc" / "scratch.hyper"), root)


def test_a_database_that_is_a_folder_is_refused(root: Path) -> None:
    (root / "123-abc" / "scratch.hyper").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a file"):
        session_folder(str(root / "123-abc" / "scratch.hyper"), root)


@pytest.mark.parametrize("name", ["99999999999999999999-x", "\u00b2-x", "x-1"])
def test_a_folder_with_a_stray_name_is_refused(root: Path, name: str) -> None:
    (root / name).mkdir()
    with pytest.raises(ValueError, match="session folder"):
        session_folder(str(root / name / "scratch.hyper"), root)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder away")
def test_another_users_folder_is_refused(root: Path) -> None:
    folder = root / "123-abc"
    folder.mkdir()
    os.chown(folder, 65534, 65534)
    with pytest.raises(ValueError, match="another user"):
        session_folder(str(folder / "scratch.hyper"), root)


# -- removing folders ------------------------------------------------------


def test_remove_deletes_a_folder_and_its_contents(root: Path) -> None:
    folder = root / "123-abc"
    (folder / "deep").mkdir(parents=True)
    (folder / "scratch.hyper").write_bytes(b"x")
    remove_session_folder(folder)
    assert not folder.exists()


def test_remove_of_an_absent_folder_is_fine(root: Path) -> None:
    remove_session_folder(root / "123-abc")
    remove_session_folder(root.parent / "absent" / "123-abc")


def test_remove_of_a_symlinked_folder_removes_the_link_only(root: Path, outside: Path) -> None:
    (root / "123-abc").symlink_to(outside)
    remove_session_folder(root / "123-abc")
    assert not os.path.lexists(root / "123-abc")
    assert (outside / "scratch.hyper").read_bytes() == b"precious"


def test_remove_never_follows_a_link_inside_the_folder(root: Path, outside: Path) -> None:
    folder = root / "123-abc"
    folder.mkdir()
    (folder / "scratch.hyper").symlink_to(outside / "scratch.hyper")
    (folder / "sub").symlink_to(outside)
    remove_session_folder(folder)
    assert not folder.exists()
    assert (outside / "scratch.hyper").read_bytes() == b"precious"


def test_remove_through_a_symlinked_sessions_folder_is_refused(
        tmp_path: Path, outside: Path) -> None:
    (outside / "123-abc").mkdir()
    (outside / "123-abc" / "data").write_bytes(b"keep")
    root = tmp_path / "sessions"
    root.symlink_to(outside)
    with pytest.raises(OSError):
        remove_session_folder(root / "123-abc")
    assert (outside / "123-abc" / "data").read_bytes() == b"keep"
