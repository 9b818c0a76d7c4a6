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

import pytest
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from hyperdaemon import __version__
from hyperdaemon.tap import Options
from support import QUICK, READY_TIMEOUT, ask, free_port, pid_alive, port_is_free, status, wait_for

BIN = Path(sys.executable).parent


class OptionsTests(SynchronousTestCase):
    def test_defaults_are_left_to_the_environment(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertEqual((options["port"], options["idle-timeout"], options["state-dir"],
                          options["compat"]), (None, None, None, 0))

    def test_flags_parse(self) -> None:
        options = Options()
        options.parseOptions(["--port", "1234", "--idle-timeout", "5", "--state-dir", "/x",
                              "--compat"])
        self.assertEqual((options["port"], options["idle-timeout"], options["state-dir"],
                          options["compat"]), ("1234", "5", "/x", 1))

    def test_bad_values_end_the_command_with_one_line_not_a_usage_error(self) -> None:
        # twistd and twist print their whole usage for a UsageError.
        for argv, line in ((["--port", "nope"], "--port is 'nope'"),
                           (["--idle-timeout", "-1"], "--idle-timeout is '-1'")):
            with self.assertRaises(SystemExit) as caught:
                Options().parseOptions(argv)
            self.assertNotIsInstance(caught.exception, usage.UsageError)
            self.assertIn(line, str(caught.exception.code))
            self.assertNotIn("\n", str(caught.exception.code))


class TwistdTests(SynchronousTestCase):
    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.port = free_port()
        self.env = dict(os.environ, HYPERDB_STATE_DIR=str(self.state))

    def spawn(self, *argv: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            argv, cwd=self.tmp, env=self.env, text=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )

        def cleanup() -> None:
            if proc.poll() is None:
                proc.kill()
                proc.wait(QUICK)
            proc.stdout.close()

        self.addCleanup(cleanup)
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
        self.assertEqual(result.returncode, 0, result.stderr)
        for flag in ("--port", "--idle-timeout", "--state-dir", "--compat"):
            self.assertIn(flag, result.stdout)

    def test_foreground_twistd_runs_and_stops_on_sigterm(self) -> None:
        proc = self.spawn(str(BIN / "twistd"), "-n", "--pidfile=", "hyperdaemon",
                          "--port", str(self.port), "--idle-timeout", "0")
        facts = self.wait_ready()
        self.assertEqual(facts["pid"], proc.pid)
        self.assertEqual(ask(self.port, "PING"), [f"PONG hyperdb-mcp {__version__}"])
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(QUICK), 0)
        self.assertTrue(port_is_free(self.port))
        self.assertFalse((self.state / "daemon.json").exists())
        self.assertFalse(pid_alive(facts["hyperd_pid"]))

    def test_twist_runs_the_plugin(self) -> None:
        proc = self.spawn(str(BIN / "twist"), "hyperdaemon", "--port", str(self.port),
                          "--idle-timeout", "0")
        facts = self.wait_ready()
        self.assertEqual(facts["pid"], proc.pid)
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(QUICK), 0)
        self.assertTrue(port_is_free(self.port))

    def test_daemonized_twistd_honours_pidfile_and_logfile(self) -> None:
        pidfile, logfile = self.tmp / "d.pid", self.tmp / "d.log"
        result = subprocess.run(
            [str(BIN / "twistd"), f"--pidfile={pidfile}", f"--logfile={logfile}",
             "hyperdaemon", "--port", str(self.port), "--idle-timeout", "0"],
            env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=QUICK,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        pid = int(pidfile.read_text())
        self.addCleanup(lambda: pid_alive(pid) and os.kill(pid, signal.SIGKILL))
        facts = self.wait_ready()
        self.assertEqual(facts["pid"], pid)
        self.assertIn("answering on 127.0.0.1", logfile.read_text())
        stop = subprocess.run(
            [sys.executable, "-m", "hyperdaemon", "daemon", "stop", "--port", str(self.port)],
            env=self.env, capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(stop.returncode, 0, stop.stderr)
        self.assertFalse(pid_alive(pid))
        self.assertFalse(pidfile.exists())
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
            self.assertNotEqual(second.returncode, 0)
            self.assertIn(f"already running on port {self.port}", second.stderr)
            self.assertNotIn("Traceback", second.stderr)
        self.assertIsNone(first.poll())

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
                self.assertEqual((result.returncode, result.stdout), (1, ""),
                                 f"{runner} {flags}: {result.stdout}{result.stderr}")
                lines = result.stderr.splitlines()
                self.assertEqual(len(lines), 1, f"{runner} {flags}: {result.stderr}")
                self.assertTrue(lines[0].startswith(f"{runner} hyperdaemon: {message}"), lines[0])
        self.assertTrue(port_is_free(self.port))

    def test_unknown_flag_gets_the_runners_usage_and_exit_status(self) -> None:
        # README: twistd exits 1 with its usage on stdout, twist 64 (EX_USAGE) on stderr.
        for runner, before, code in (("twistd", ["-n", "--pidfile="], 1), ("twist", [], 64)):
            result = subprocess.run(
                [str(BIN / runner), *before, "hyperdaemon", "--bogus"],
                env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=QUICK,
            )
            output = result.stdout + result.stderr
            self.assertEqual(result.returncode, code, output)
            self.assertIn("--bogus", output)
            self.assertIn("--idle-timeout", output)  # the plugin's own usage
            self.assertNotIn("Traceback", output)
