"""
Unit tests for L{hyperdaemon.config}: flags beat environment variables beat
defaults, and every bad value is a L{ConfigError} naming its source.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hyperdaemon.config import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_PORT_RANGE,
    ConfigError,
    PortChoice,
    bundled_hyperd,
    hyperd_executable,
    idle_timeout,
    port_choice,
    state_dir,
)

PORT = "HYPERDB_DAEMON_PORT"
RANGE = "HYPERDB_DAEMON_PORT_RANGE"
IDLE = "HYPERDB_DAEMON_IDLE_TIMEOUT"
STATE = "HYPERDB_STATE_DIR"
HYPERD = "HYPERD_PATH"


# -- port ---------------------------------------------------------------------


def test_port_flag_beats_environment() -> None:
    assert port_choice("40001", {PORT: "40002"}).pinned == 40001


def test_port_flag_may_be_an_int() -> None:
    assert port_choice(40001, {}).pinned == 40001


def test_port_environment_beats_default() -> None:
    assert port_choice(None, {PORT: "40002"}).pinned == 40002


def test_port_environment_is_trimmed() -> None:
    assert port_choice(None, {PORT: " 40002\n"}).pinned == 40002


@pytest.mark.parametrize("environ", [{}, {PORT: ""}, {PORT: "   "}])
def test_port_default_is_a_scan_of_7485_to_7500(environ: dict[str, str]) -> None:
    choice = port_choice(None, environ)
    assert choice == PortChoice(None, 7485, 7500)
    assert DEFAULT_PORT_RANGE == (7485, 7500)


@pytest.mark.parametrize("value", ["abc", "0", "70000", "65536", "-1", "", "12.5"])
def test_invalid_port_flag_raises_naming_the_flag(value: str) -> None:
    with pytest.raises(ConfigError, match="--port"):
        port_choice(value, {})


@pytest.mark.parametrize("value", ["abc", "0", "70000"])
def test_invalid_port_variable_raises_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        port_choice(None, {PORT: value})
    assert PORT in str(caught.value)
    assert repr(value) in str(caught.value)


def test_invalid_port_variable_is_ignored_when_the_flag_is_given() -> None:
    assert port_choice("40001", {PORT: "abc"}).pinned == 40001


@pytest.mark.parametrize("value", ["1", "65535"])
def test_port_bounds_are_accepted(value: str) -> None:
    assert port_choice(value, {}).pinned == int(value)


def test_port_range_variable_sets_the_scan() -> None:
    assert port_choice(None, {RANGE: "40100-40110"}) == PortChoice(None, 40100, 40110)


def test_port_range_variable_tolerates_spaces() -> None:
    assert port_choice(None, {RANGE: " 40100 - 40110 "}) == PortChoice(None, 40100, 40110)


def test_port_range_of_one_port() -> None:
    assert port_choice(None, {RANGE: "40100-40100"}).candidates() == range(40100, 40101)


def test_pinned_port_keeps_the_range() -> None:
    assert port_choice("40001", {RANGE: "40100-40110"}) == PortChoice(40001, 40100, 40110)


@pytest.mark.parametrize(
    "spec",
    ["40100", "40100:40110", "abc-40110", "40100-abc", "0-10", "40100-70000", "40110-40100", "-"],
)
def test_bad_port_range_raises_naming_the_variable(spec: str) -> None:
    with pytest.raises(ConfigError, match=RANGE):
        port_choice(None, {RANGE: spec})


def test_reversed_port_range_message_says_first_must_not_exceed_last() -> None:
    with pytest.raises(ConfigError, match="must not exceed"):
        port_choice(None, {RANGE: "40110-40100"})


def test_candidates_of_a_pinned_port_are_that_port_only() -> None:
    assert list(PortChoice(40001, 7485, 7500).candidates()) == [40001]


def test_candidates_of_a_scan_include_both_ends() -> None:
    candidates = PortChoice(None, 7485, 7500).candidates()
    assert list(candidates) == list(range(7485, 7501))
    assert len(candidates) == 16


# -- idle timeout -------------------------------------------------------------


def test_idle_timeout_flag_beats_environment() -> None:
    assert idle_timeout("5", {IDLE: "7"}) == 5.0


def test_idle_timeout_flag_may_be_a_number() -> None:
    assert idle_timeout(2.5, {}) == 2.5


def test_idle_timeout_environment_beats_default() -> None:
    assert idle_timeout(None, {IDLE: "7.5"}) == 7.5


@pytest.mark.parametrize("environ", [{}, {IDLE: ""}, {IDLE: "  "}])
def test_idle_timeout_default_is_1800(environ: dict[str, str]) -> None:
    assert idle_timeout(None, environ) == DEFAULT_IDLE_TIMEOUT == 1800.0


@pytest.mark.parametrize("source", ["flag", "env"])
def test_idle_timeout_zero_means_never_and_is_accepted(source: str) -> None:
    result = idle_timeout("0", {}) if source == "flag" else idle_timeout(None, {IDLE: "0"})
    assert result == 0.0


@pytest.mark.parametrize("value", ["-1", "x", "inf", "-inf", "nan", ""])
def test_invalid_idle_timeout_flag_raises_naming_the_flag(value: str) -> None:
    with pytest.raises(ConfigError, match="--idle-timeout"):
        idle_timeout(value, {})


@pytest.mark.parametrize("value", ["-1", "x", "inf", "nan"])
def test_invalid_idle_timeout_variable_raises_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        idle_timeout(None, {IDLE: value})
    assert IDLE in str(caught.value)
    assert repr(value) in str(caught.value)


# -- state directory ----------------------------------------------------------


def test_state_dir_flag_beats_environment(tmp_path: Path) -> None:
    flag, env = tmp_path / "flag", tmp_path / "env"
    assert state_dir(str(flag), {STATE: str(env), "HOME": str(tmp_path)}) == flag


def test_state_dir_environment_beats_default(tmp_path: Path) -> None:
    env = tmp_path / "env"
    assert state_dir(None, {STATE: str(env), "HOME": str(tmp_path)}) == env


def test_state_dir_default_is_dot_hyperdb_in_home(tmp_path: Path) -> None:
    # Only computes the path; nothing is created.
    assert state_dir(None, {"HOME": str(tmp_path)}) == tmp_path / ".hyperdb"
    assert not (tmp_path / ".hyperdb").exists()


def test_state_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = state_dir("relative/state", {})
    assert result.is_absolute()
    assert result == tmp_path / "relative" / "state"


def test_state_dir_is_not_created(tmp_path: Path) -> None:
    state_dir(str(tmp_path / "flag"), {})
    assert not (tmp_path / "flag").exists()


# -- hyperd executable --------------------------------------------------------


def make_file(path: Path, mode: int) -> Path:
    path.write_bytes(b"#!/bin/sh\nexit 0\n")
    os.chmod(path, mode)
    return path


def test_hyperd_path_pointing_at_an_executable_file(tmp_path: Path) -> None:
    exe = make_file(tmp_path / "my-hyperd", 0o755)
    assert hyperd_executable({HYPERD: str(exe)}) == exe


def test_hyperd_path_pointing_at_a_folder_holding_hyperd(tmp_path: Path) -> None:
    exe = make_file(tmp_path / "hyperd", 0o755)
    assert hyperd_executable({HYPERD: str(tmp_path)}) == exe


def test_hyperd_path_to_a_folder_without_hyperd_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=HYPERD):
        hyperd_executable({HYPERD: str(tmp_path)})


def test_hyperd_path_to_a_missing_path_raises_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "hyperd"
    with pytest.raises(ConfigError) as caught:
        hyperd_executable({HYPERD: str(missing)})
    assert HYPERD in str(caught.value)
    assert str(missing) in str(caught.value)


def test_hyperd_path_to_a_non_executable_file_raises(tmp_path: Path) -> None:
    # access(X_OK) needs an execute bit even for root.
    plain = make_file(tmp_path / "hyperd", 0o644)
    with pytest.raises(ConfigError, match="not executable"):
        hyperd_executable({HYPERD: str(plain)})


def test_blank_hyperd_path_falls_back_to_the_bundled_one() -> None:
    assert hyperd_executable({HYPERD: "  "}) == hyperd_executable({})


def test_default_hyperd_is_an_executable_file_inside_tableauhyperapi() -> None:
    import importlib.util

    spec = importlib.util.find_spec("tableauhyperapi")
    assert spec is not None and spec.submodule_search_locations
    package = Path(list(spec.submodule_search_locations)[0]).resolve()
    path = hyperd_executable({})
    assert path == bundled_hyperd()
    assert path.is_file()
    assert os.access(path, os.X_OK)
    assert path.name == "hyperd"
    assert package in path.resolve().parents
