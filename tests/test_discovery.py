"""
Unit tests for L{hyperdaemon.discovery}: the state directory's preparation
and the discovery file's writing, reading and removal, in temporary
directories.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from hyperdaemon.discovery import (
    DISCOVERY_NAME,
    CorruptDiscovery,
    DaemonRecord,
    StateDirError,
    prepare_state_dir,
    read_record,
    remove_record,
    remove_record_if_owned,
    write_record,
)
from support import noted

RECORD = DaemonRecord(
    pid=4242,
    hyperd_endpoint="127.0.0.1:40001",
    health_port=40000,
    started_at="2024-01-02T03:04:05+00:00",
    version="1.0.0",
    hyperd_user="tableau_internal_user",
    hyperd_password="s3cret",
)

VALID_JSON = {
    "pid": 4242,
    "hyperd_endpoint": "127.0.0.1:40001",
    "health_port": 40000,
    "started_at": "2024-01-02T03:04:05+00:00",
    "version": "1.0.0",
    "hyperd_user": "tableau_internal_user",
    "hyperd_password": "s3cret",
}


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class TempDirMixin:
    @pytest.fixture(autouse=True)
    def _temp_dirs(self) -> Iterator[None]:
        """Removes the test's directories (whatever their modes) and restores the umask."""
        self._made: list[Path] = []
        self._umask: int | None = None
        yield
        if self._umask is not None:
            os.umask(self._umask)
        for path in reversed(self._made):
            for root, dirs, _ in os.walk(path):
                for name in dirs:
                    os.chmod(os.path.join(root, name), 0o700)
            os.chmod(path, 0o700)
            shutil.rmtree(path)

    def make_temp_dir(self) -> Path:
        """A fresh directory, removed (whatever its modes) after the test."""
        path = Path(tempfile.mkdtemp(prefix="hyperdaemon-test-"))
        self._made.append(path)
        return path

    def with_umask(self, mask: int) -> None:
        """C{mask} as the umask until the end of the test."""
        previous = os.umask(mask)
        if self._umask is None:
            self._umask = previous


class PrepareStateDirTests(TempDirMixin):
    def test_creates_missing_dir_and_logs_dir_with_mode_0700(self) -> None:
        state = self.make_temp_dir() / "nested" / "state"
        logs = prepare_state_dir(state)
        assert logs == state / "logs"
        assert state.is_dir()
        assert logs.is_dir()
        assert mode_of(state) == 0o700
        assert mode_of(logs) == 0o700

    def test_dirs_are_0700_whatever_the_umask(self) -> None:
        base = self.make_temp_dir()
        for mask in (0o000, 0o022, 0o277):
            self.with_umask(mask)
            state = base / f"state-{mask:o}"
            logs = prepare_state_dir(state)
            assert (mode_of(state), mode_of(logs)) == (0o700, 0o700), oct(mask)

    def test_tightens_an_existing_0755_dir_and_logs_to_0700(self) -> None:
        state = self.make_temp_dir() / "state"
        (state / "logs").mkdir(parents=True)
        os.chmod(state, 0o755)
        os.chmod(state / "logs", 0o755)
        prepare_state_dir(state)
        assert mode_of(state) == 0o700
        assert mode_of(state / "logs") == 0o700

    def test_keeps_existing_files(self) -> None:
        state = self.make_temp_dir() / "state"
        prepare_state_dir(state)
        write_record(state, RECORD)
        prepare_state_dir(state)
        assert read_record(state) == RECORD

    def test_leaves_no_probe_file_behind(self) -> None:
        state = self.make_temp_dir() / "state"
        prepare_state_dir(state)
        assert sorted(os.listdir(state)) == ["logs", "sessions"]

    def test_regular_file_raises_state_dir_error(self) -> None:
        state = self.make_temp_dir() / "state"
        state.write_bytes(b"not a directory")
        with pytest.raises(StateDirError) as caught:
            prepare_state_dir(state)
        message = str(caught.value)
        assert str(state) in message
        assert "--state-dir" in message
        assert state.read_bytes() == b"not a directory"

    def test_logs_path_that_is_a_regular_file_raises_state_dir_error(self) -> None:
        state = self.make_temp_dir() / "state"
        state.mkdir(mode=0o700)
        (state / "logs").write_bytes(b"")
        with pytest.raises(StateDirError):
            prepare_state_dir(state)

    def test_dir_under_an_unwritable_parent_raises_state_dir_error(self) -> None:
        if os.geteuid() == 0:
            pytest.skip("root may write anywhere")
        parent = self.make_temp_dir() / "readonly"
        parent.mkdir(mode=0o500)
        state = parent / "state"
        with pytest.raises(StateDirError) as caught:
            prepare_state_dir(state)
        assert str(state) in str(caught.value)
        assert not state.exists()


class WriteRecordTests(TempDirMixin):
    @pytest.fixture(autouse=True)
    def _state(self, _temp_dirs: None) -> None:
        self.state = self.make_temp_dir() / "state"
        prepare_state_dir(self.state)

    def test_file_is_mode_0600(self) -> None:
        self.with_umask(0o000)
        write_record(self.state, RECORD)
        assert mode_of(self.state / DISCOVERY_NAME) == 0o600

    def test_file_holds_exactly_the_record_fields(self) -> None:
        write_record(self.state, RECORD)
        data = json.loads((self.state / DISCOVERY_NAME).read_text("utf-8"))
        assert data == VALID_JSON

    def test_password_none_is_written_as_null(self) -> None:
        record = DaemonRecord(4242, "127.0.0.1:1", 2, "2024-01-02T03:04:05Z", "1.0.0")
        write_record(self.state, record)
        data = json.loads((self.state / DISCOVERY_NAME).read_text("utf-8"))
        assert "hyperd_password" in data
        assert data["hyperd_password"] is None

    def test_read_record_round_trips(self) -> None:
        write_record(self.state, RECORD)
        assert read_record(self.state) == RECORD

    def test_read_record_round_trips_without_credentials(self) -> None:
        record = DaemonRecord(1, "127.0.0.1:1", 65535, "2024-01-02T03:04:05Z", "0.1")
        write_record(self.state, record)
        assert read_record(self.state) == record

    def test_write_replaces_an_existing_record(self) -> None:
        write_record(self.state, RECORD)
        newer = DaemonRecord(999, "127.0.0.1:2", 40002, "2025-01-01T00:00:00Z", "1.0.1")
        write_record(self.state, newer)
        assert read_record(self.state) == newer

    def test_write_leaves_no_temporary_files(self) -> None:
        write_record(self.state, RECORD)
        write_record(self.state, RECORD)
        assert sorted(os.listdir(self.state)) == [DISCOVERY_NAME, "logs", "sessions"]

    def test_failed_write_raises_and_leaves_no_temporary_file(self) -> None:
        # The final rename cannot replace a directory.
        (self.state / DISCOVERY_NAME).mkdir()
        with pytest.raises(OSError):
            write_record(self.state, RECORD)
        assert sorted(os.listdir(self.state)) == [DISCOVERY_NAME, "logs", "sessions"]


class ReadRecordTests(TempDirMixin):
    @pytest.fixture(autouse=True)
    def _state(self, _temp_dirs: None) -> None:
        self.state = self.make_temp_dir() / "state"
        prepare_state_dir(self.state)

    def put(self, content: bytes | object) -> None:
        if not isinstance(content, bytes):
            content = json.dumps(content).encode("utf-8")
        (self.state / DISCOVERY_NAME).write_bytes(content)

    def test_missing_file_gives_none(self) -> None:
        assert read_record(self.state) is None

    def test_missing_state_dir_gives_none(self) -> None:
        assert read_record(self.state / "absent") is None

    def test_garbage_bytes_raise_corrupt_discovery(self) -> None:
        self.put(b"\x00\x01garbage{{{")
        with pytest.raises(CorruptDiscovery):
            read_record(self.state)

    def test_invalid_utf8_raises_corrupt_discovery(self) -> None:
        self.put(b'{"pid": "\xff"}')
        with pytest.raises(CorruptDiscovery):
            read_record(self.state)

    def test_empty_file_raises_corrupt_discovery(self) -> None:
        self.put(b"")
        with pytest.raises(CorruptDiscovery):
            read_record(self.state)

    def test_truncated_json_raises_corrupt_discovery(self) -> None:
        self.put(json.dumps(VALID_JSON).encode("utf-8")[:-10])
        with pytest.raises(CorruptDiscovery):
            read_record(self.state)

    def test_json_list_raises_corrupt_discovery(self) -> None:
        self.put([VALID_JSON])
        with pytest.raises(CorruptDiscovery):
            read_record(self.state)

    def test_json_scalar_raises_corrupt_discovery(self) -> None:
        self.put(42)
        with pytest.raises(CorruptDiscovery):
            read_record(self.state)

    def test_each_missing_required_field_raises_corrupt_discovery(self) -> None:
        for field in ("pid", "hyperd_endpoint", "health_port", "started_at", "version"):
            data = dict(VALID_JSON)
            del data[field]
            self.put(data)
            with noted(field), pytest.raises(CorruptDiscovery) as caught:
                read_record(self.state)
            assert field in str(caught.value)

    def test_optional_credentials_may_be_absent(self) -> None:
        data = dict(VALID_JSON)
        del data["hyperd_user"], data["hyperd_password"]
        self.put(data)
        record = read_record(self.state)
        assert record is not None
        assert record.hyperd_user is None
        assert record.hyperd_password is None

    def test_extra_fields_are_tolerated(self) -> None:
        self.put({**VALID_JSON, "future_field": [1, 2]})
        assert read_record(self.state) == RECORD

    def test_wrong_types_raise_corrupt_discovery(self) -> None:
        cases = [
            ("pid", "4242"),
            ("pid", 4242.0),
            ("pid", 0),
            ("pid", -1),
            ("pid", None),
            ("health_port", "40000"),
            ("health_port", 0),
            ("health_port", 70000),
            ("hyperd_endpoint", 40001),
            ("hyperd_endpoint", None),
            ("started_at", 1700000000),
            ("version", 1),
            ("hyperd_user", 7),
            ("hyperd_password", ["s3cret"]),
        ]
        for field, value in cases:
            self.put({**VALID_JSON, field: value})
            with noted(f"{field}={value!r}"), pytest.raises(CorruptDiscovery):
                read_record(self.state)

    def test_boolean_pid_or_port_raises_corrupt_discovery(self) -> None:
        for field in ("pid", "health_port"):
            self.put({**VALID_JSON, field: True})
            with noted(field), pytest.raises(CorruptDiscovery):
                read_record(self.state)


class RemoveRecordTests(TempDirMixin):
    @pytest.fixture(autouse=True)
    def _state(self, _temp_dirs: None) -> None:
        self.state = self.make_temp_dir() / "state"
        prepare_state_dir(self.state)
        self.path = self.state / DISCOVERY_NAME

    def test_removes_own_record(self) -> None:
        write_record(self.state, RECORD)
        assert remove_record_if_owned(self.state, RECORD.pid, RECORD.health_port)
        assert not self.path.exists()

    def test_leaves_record_of_another_pid(self) -> None:
        write_record(self.state, RECORD)
        assert not remove_record_if_owned(self.state, RECORD.pid + 1, RECORD.health_port)
        assert read_record(self.state) == RECORD

    def test_leaves_record_of_another_port(self) -> None:
        write_record(self.state, RECORD)
        assert not remove_record_if_owned(self.state, RECORD.pid, RECORD.health_port + 1)
        assert read_record(self.state) == RECORD

    def test_missing_record_is_not_an_error(self) -> None:
        assert not remove_record_if_owned(self.state, RECORD.pid, RECORD.health_port)

    def test_leaves_a_corrupt_file_alone(self) -> None:
        self.path.write_bytes(b"garbage")
        assert not remove_record_if_owned(self.state, RECORD.pid, RECORD.health_port)
        assert self.path.read_bytes() == b"garbage"

    def test_remove_record_removes_any_file_and_tolerates_none(self) -> None:
        self.path.write_bytes(b"garbage")
        remove_record(self.state)
        assert not self.path.exists()
        remove_record(self.state)


class StateDirLinkTests(TempDirMixin):
    """The state directory is checked as the link it may be, not only its target."""

    def test_another_users_symlink_is_refused_and_its_target_left_alone(self) -> None:
        if os.geteuid() != 0:
            pytest.skip("needs root to make a link of another user")
        base = self.make_temp_dir()
        target = base / "victim"
        target.mkdir(mode=0o755)
        os.chmod(target, 0o755)
        state = base / "state"
        state.symlink_to(target)
        os.lchown(state, 65534, 65534)
        with pytest.raises(StateDirError) as caught:
            prepare_state_dir(state)
        message = str(caught.value)
        assert str(state) in message
        assert "symbolic link owned by another user (uid 65534)" in message
        assert "--state-dir" in message
        assert mode_of(target) == 0o755
        assert os.listdir(target) == []

    def test_own_symlink_to_own_directory_is_accepted(self) -> None:
        base = self.make_temp_dir()
        target = base / "real"
        target.mkdir()
        os.chmod(target, 0o755)
        state = base / "state"
        state.symlink_to(target)
        prepare_state_dir(state)
        assert mode_of(target) == 0o700
        assert sorted(os.listdir(target)) == ["logs", "sessions"]

    def test_a_symlinked_sessions_folder_is_refused(self) -> None:
        base = self.make_temp_dir()
        elsewhere = base / "elsewhere"
        elsewhere.mkdir()
        state = base / "state"
        state.mkdir(mode=0o700)
        (state / "sessions").symlink_to(elsewhere)
        with pytest.raises(StateDirError) as caught:
            prepare_state_dir(state)
        assert (f"{state / 'sessions'} in the state directory is a symbolic link"
                in str(caught.value))


class OddDiscoveryFileTests(TempDirMixin):
    """Whatever sits at daemon.json, reading it neither blocks nor trusts it."""

    @pytest.fixture(autouse=True)
    def _state(self, _temp_dirs: None) -> None:
        self.state = self.make_temp_dir() / "state"
        prepare_state_dir(self.state)
        self.path = self.state / DISCOVERY_NAME

    def test_a_fifo_is_corrupt_at_once_and_removable(self) -> None:
        import threading

        os.mkfifo(self.path, 0o600)
        outcome: list[object] = []

        def read() -> None:
            try:
                outcome.append(read_record(self.state))
            except CorruptDiscovery as e:
                outcome.append(e)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(10)
        if reader.is_alive():
            # Release the blocked reader before failing.
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            reader.join(10)
            pytest.fail("reading a FIFO at daemon.json blocked")
        assert isinstance(outcome[0], CorruptDiscovery)
        assert remove_record(self.state)
        assert not os.path.lexists(self.path)

    def test_a_directory_is_corrupt_and_an_empty_one_is_removed(self) -> None:
        self.path.mkdir()
        with pytest.raises(CorruptDiscovery):
            read_record(self.state)
        assert remove_record(self.state)
        assert not os.path.lexists(self.path)

    def test_a_full_directory_is_left_without_an_error(self) -> None:
        self.path.mkdir()
        (self.path / "inside").write_bytes(b"")
        assert not remove_record(self.state)
        assert (self.path / "inside").exists()
        assert not remove_record_if_owned(self.state, RECORD.pid, RECORD.health_port)

    def test_a_symlink_to_a_valid_record_is_not_followed(self) -> None:
        elsewhere = self.state.parent / "elsewhere"
        elsewhere.mkdir()
        write_record(elsewhere, RECORD)
        self.path.symlink_to(elsewhere / DISCOVERY_NAME)
        with pytest.raises(CorruptDiscovery):
            read_record(self.state)
        assert remove_record(self.state)
        assert not os.path.lexists(self.path)
        assert read_record(elsewhere) == RECORD

    def test_a_record_others_may_write_is_not_trusted(self) -> None:
        write_record(self.state, RECORD)
        os.chmod(self.path, 0o666)
        with pytest.raises(CorruptDiscovery) as caught:
            read_record(self.state)
        assert "writable by other users" in str(caught.value)

    def test_another_users_record_is_not_trusted_nor_removed(self) -> None:
        if os.geteuid() != 0:
            pytest.skip("needs root to give a file away")
        write_record(self.state, RECORD)
        os.chown(self.path, 65534, 65534)
        with pytest.raises(CorruptDiscovery) as caught:
            read_record(self.state)
        assert "another user" in str(caught.value)
        assert not remove_record(self.state)
        assert self.path.exists()

    def test_an_over_long_file_is_corrupt(self) -> None:
        self.path.write_bytes(b" " * (1024 * 1024))
        os.chmod(self.path, 0o600)
        with pytest.raises(CorruptDiscovery):
            read_record(self.state)
