"""
The twistd plugin: C{twistd hyperdaemon} in the foreground and daemonized,
and C{twist hyperdaemon}, run as real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from twisted.python import usage

from hyperdaemon import __version__
from hyperdaemon.daemon.tap import Options
from support import QUICK, READY_TIMEOUT, ask, free_port, pid_alive, port_is_free, status, wait_for

BIN = Path(sys.executable).parent


class OptionsTests:
    def test_defaults_are_left_to_the_environment(self) -> None:
        options = Options()
        options.parseOptions([])
        assert ((options["port"], options["idle-timeout"], options["state-dir"],
                 options["compat"]) == (None, None, None, 0))

    def test_flags_parse(self) -> None:
        options = Options()
        options.parseOptions(["--port", "1234", "--idle-timeout", "5", "--state-dir", "/x",
                              "--compat"])
        assert ((options["port"], options["idle-timeout"], options["state-dir"],
                 options["compat"]) == ("1234", "5", "/x", 1))

    def test_bad_values_end_the_command_with_one_line_not_a_usage_error(self) -> None:
        # twistd and twist print their whole usage for a UsageError.
        for argv, line in ((["--port", "nope"], "--port is 'nope'"),
                           (["--idle-timeout", "-1"], "--idle-timeout is '-1'")):
            with pytest.raises(SystemExit) as caught:
                Options().parseOptions(argv)
            assert not isinstance(caught.value, usage.UsageError)
            assert line in str(caught.value.code)
            assert "\n" not in str(caught.value.code)


class TwistdTests:
    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> Iterator[None]:
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.port = free_port()
        self.env = dict(os.environ, HYPERDB_STATE_DIR=str(self.state))
        self.spawned: list[subprocess.Popen[str]] = []
        self.daemonized: list[int] = []
        yield
        for pid in self.daemonized:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for proc in reversed(self.spawned):
            if proc.poll() is None:
                proc.kill()
                proc.wait(QUICK)
            proc.stdout.close()

    def spawn(self, *argv: str) -> subprocess.Popen[str]:
        """Run C{argv}; it is killed after the test if it still runs."""
        proc = subprocess.Popen(
            argv, cwd=self.tmp, env=self.env, text=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.spawned.append(proc)
        return proc

    def wait_ready(self) -> dict:
        def ready() -> dict | None:
            try:
                facts = status(self.port)
            except (OSError, ValueError):
                return None
            return facts if facts["state"] == "ready" else None

        return wait_for(ready, READY_TIMEOUT, "the daemon to be ready")

    def test_help_lists_the_options(self) -> None:
        result = subprocess.run([str(BIN / "twistd"), "hyperdaemon", "--help"],
                                capture_output=True, text=True, timeout=QUICK, cwd=self.tmp)
        assert result.returncode == 0, result.stderr
        for flag in ("--port", "--idle-timeout", "--state-dir", "--compat"):
            assert flag in result.stdout

    def test_foreground_twistd_runs_and_stops_on_sigterm(self) -> None:
        proc = self.spawn(str(BIN / "twistd"), "-n", "--pidfile=", "hyperdaemon",
                          "--port", str(self.port), "--idle-timeout", "0")
        facts = self.wait_ready()
        assert facts["pid"] == proc.pid
        assert ask(self.port, "PING") == [f"PONG hyperdb-mcp {__version__}"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(QUICK) == 0
        assert port_is_free(self.port)
        assert not (self.state / "daemon.json").exists()
        assert not pid_alive(facts["hyperd_pid"])

    def test_twist_runs_the_plugin(self) -> None:
        proc = self.spawn(str(BIN / "twist"), "hyperdaemon", "--port", str(self.port),
                          "--idle-timeout", "0")
        facts = self.wait_ready()
        assert facts["pid"] == proc.pid
        proc.send_signal(signal.SIGINT)
        assert proc.wait(QUICK) == 0
        assert port_is_free(self.port)

    def test_daemonized_twistd_honours_pidfile_and_logfile(self) -> None:
        pidfile, logfile = self.tmp / "d.pid", self.tmp / "d.log"
        result = subprocess.run(
            [str(BIN / "twistd"), f"--pidfile={pidfile}", f"--logfile={logfile}",
             "hyperdaemon", "--port", str(self.port), "--idle-timeout", "0"],
            env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=QUICK,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        pid = int(pidfile.read_text())
        self.daemonized.append(pid)  # killed after the test if it still runs
        facts = self.wait_ready()
        assert facts["pid"] == pid
        assert "answering on 127.0.0.1" in logfile.read_text()
        stop = subprocess.run(
            [sys.executable, "-m", "hyperdaemon", "daemon", "stop", "--port", str(self.port)],
            env=self.env, capture_output=True, text=True, timeout=60,
        )
        assert stop.returncode == 0, stop.stderr
        assert not pid_alive(pid)
        assert not pidfile.exists()
        wait_for(lambda: not pid_alive(facts["hyperd_pid"]), QUICK, "hyperd to exit")

    def test_second_twistd_is_refused_naming_the_first(self) -> None:
        first = self.spawn(str(BIN / "twistd"), "-n", "--pidfile=", "hyperdaemon",
                           "--port", str(self.port), "--idle-timeout", "0")
        self.wait_ready()
        for foreground in (["-n", "--pidfile="], [f"--pidfile={self.tmp / 'second.pid'}"]):
            second = subprocess.run(
                [str(BIN / "twistd"), *foreground, "hyperdaemon", "--port", str(self.port)],
                env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=QUICK,
            )
            assert second.returncode != 0
            assert f"already running on port {self.port}" in second.stderr
            assert "Traceback" not in second.stderr
        assert first.poll() is None

    def test_bad_value_is_refused_in_one_line_without_the_usage(self) -> None:
        cases = [
            (["--port", "banana"], "--port is 'banana', which is not a port number"),
            (["--idle-timeout", "-5"], "--idle-timeout is '-5': give the idle timeout"),
        ]
        for runner, before in (("twistd", ["-n", "--pidfile="]), ("twist", [])):
            for flags, message in cases:
                result = subprocess.run(
                    [str(BIN / runner), *before, "hyperdaemon", *flags],
                    env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=QUICK,
                )
                assert ((result.returncode, result.stdout)
                        == (1, "")), f"{runner} {flags}: {result.stdout}{result.stderr}"
                lines = result.stderr.splitlines()
                assert len(lines) == 1, f"{runner} {flags}: {result.stderr}"
                assert lines[0].startswith(f"{runner} hyperdaemon: {message}"), lines[0]
        assert port_is_free(self.port)

    def test_unknown_flag_gets_the_runners_usage_and_exit_status(self) -> None:
        # README: twistd exits 1 with its usage on stdout, twist 64 (EX_USAGE) on stderr.
        for runner, before, code in (("twistd", ["-n", "--pidfile="], 1), ("twist", [], 64)):
            result = subprocess.run(
                [str(BIN / runner), *before, "hyperdaemon", "--bogus"],
                env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=QUICK,
            )
            output = result.stdout + result.stderr
            assert result.returncode == code, output
            assert "--bogus" in output
            assert "--idle-timeout" in output  # the plugin's own usage
            assert "Traceback" not in output
