"""
The MCP host and its launchers: real launchers (C{python -m hyperdaemon})
driven by the SDK's stdio client, the real daemon, its real host and
C{hyperd}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_twisted

from support import QUICK, READY_TIMEOUT, pid_alive, run_as, status, wait_for
from mcp_support import McpTestCase, ToolCallError

NOBODY = 65534
#: What the launcher must not import on its warm path.
HEAVY = ("twisted", "mcp", "pydantic", "psycopg", "attrs", "anyio", "sqlglot")
#: Standard modules of the full command line that the warm launcher does without.
SLOW_STANDARD = ("argparse", "gettext", "locale", "shutil", "pathlib", "datetime", "typing")
#: Python wrappers whose C modules the warm launcher takes instead.
WRAPPERS = ("socket", "selectors", "signal")


def launcher_pid(facts: dict[str, Any]) -> int:
    """The launcher's pid, which names its session's folder (C{<pid>-...})."""
    return int(Path(facts["ephemeral_db"]).parent.name.partition("-")[0])


class HostTests(McpTestCase):
    def daemon_facts(self) -> dict[str, Any]:
        return status(self.ports[0])

    @contextlib.asynccontextmanager
    async def launcher(self, *python: str, errlog: Any = None,
                       flags: tuple[str, ...] = ()) -> AsyncIterator[Any]:
        """An initialized client of C{python ... -m hyperdaemon flags...}, stderr to C{errlog}."""
        from mcp.client.session import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        params = StdioServerParameters(command=sys.executable,
                                       args=[*python, "-m", "hyperdaemon", *flags],
                                       env=self.env)
        async with stdio_client(params, errlog=errlog or sys.stderr) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session

    def test_a_launcher_is_served_by_the_daemons_host(self) -> None:
        async def go() -> dict[str, Any]:
            async with self.server() as s:
                facts = await self.call(s, "status")
                self.assertEqual((await self.call(s, "query", sql="SELECT 6 * 7"))["rows"],
                                 [[42]])
                daemon = self.daemon_facts()
                self.assertEqual(daemon["mcp_host"]["state"], "ready")
                self.assertEqual(facts["host_pid"], daemon["mcp_host"]["pid"])
                listed = daemon["mcp_host"]["sessions"]
                self.assertEqual([(s["pid"], s["ephemeral_db"]) for s in listed],
                                 [(launcher_pid(facts), facts["ephemeral_db"])])
                # The daemon knows the session by its launcher.
                self.assertEqual([s["pid"] for s in daemon["sessions"]], [launcher_pid(facts)])
                # This launcher spawned the daemon (the cold path imports
                # Twisted), then started afresh with the standard library.
                maps = Path(f"/proc/{launcher_pid(facts)}/maps").read_text()
                self.assertFalse("zope" in maps, "the launcher still holds Twisted's imports")
                return facts

        facts = self.drive(go())
        self.assertEqual(facts["served_by"], "mcp host")
        self.assertEqual(facts["mode"], "daemon")
        # Every tool family shares the host's one server (a family that
        # needs its session while the server is made costs a server each).
        log = (self.state / "logs" / "daemon.log").read_text()
        self.assertIn("accepts launchers", log)
        self.assertNotIn("one server per session", log)
        # Spawned for a launcher, the daemon started its host before its
        # own imports (hoststart) and adopted it, rather than spawning one.
        self.assertIn(f"the MCP host (pid {facts['host_pid']}) started with the daemon", log)
        self.assertNotIn("started the MCP host", log)
        # The session closed with its launcher: its scratch database is gone.
        wait_for(lambda: not Path(facts["ephemeral_db"]).parent.exists(), QUICK,
                 "the session's folder to go")
        wait_for(lambda: self.daemon_facts()["mcp_host"]["sessions"] == [], QUICK,
                 "the host to drop the session")

    def spare_of(self, host_pid: int) -> Path:
        """The scratch database that host C{host_pid} made ahead, once it has."""
        from hyperdaemon.client.session import EPHEMERAL_NAME

        return wait_for(lambda: next(iter(
            (self.state / "sessions").glob(f"{host_pid}-spare-*/{EPHEMERAL_NAME}")), None),
            QUICK, "the host's spare scratch database")

    def test_a_launcher_gets_the_scratch_database_the_host_made_ahead(self) -> None:
        async def first() -> dict[str, Any]:
            async with self.server() as s:
                return await self.call(s, "status")

        host_pid = self.drive(first())["host_pid"]
        spare = self.spare_of(host_pid)
        made_ahead = spare.stat().st_ino

        async def second() -> tuple[dict[str, Any], int]:
            async with self.server() as s:
                facts = await self.call(s, "status")
                await self.call(s, "execute", sql=["CREATE TABLE mine (x int)",
                                                   "INSERT INTO mine VALUES (5)"])
                rows = (await self.call(s, "query", sql="SELECT x FROM mine"))["rows"]
                self.assertEqual(rows, [[5]])
                return facts, Path(facts["ephemeral_db"]).stat().st_ino

        facts, inode = self.drive(second())
        # The very file, moved into a folder named for the launcher.
        self.assertEqual(inode, made_ahead)
        self.assertTrue(Path(facts["ephemeral_db"]).parent.name.startswith(
            f"{launcher_pid(facts)}-"))
        self.assertFalse(spare.parent.exists())
        # Another is made for the next launcher; the session's folder went with it.
        self.assertNotEqual(self.spare_of(host_pid).stat().st_ino, made_ahead)
        wait_for(lambda: not Path(facts["ephemeral_db"]).parent.exists(), QUICK,
                 "the session's folder to go")

    def test_stopping_the_daemon_stops_its_host_cleanly(self) -> None:
        async def go() -> dict[str, Any]:
            async with self.server() as s:
                return await self.call(s, "status")

        facts = self.drive(go())
        self.spare_of(facts["host_pid"])
        subprocess.run([sys.executable, "-m", "hyperdaemon", "daemon", "stop"], env=self.env,
                       capture_output=True, timeout=READY_TIMEOUT, check=True)
        self.assertFalse(pid_alive(facts["host_pid"]))
        # Its spare scratch database went with it.
        self.assertEqual(list((self.state / "sessions").iterdir()), [])
        host_lines = [line for line in (self.state / "logs" / "daemon.log").read_text()
                      .splitlines() if "mcp host[" in line]
        # Told twice (its pipe closes, then SIGTERM), it stops once, quietly.
        self.assertFalse([line for line in host_lines if "Traceback" in line
                          or "#critical" in line or "#error" in line], host_lines)
        # Nor does it repeat, with Twisted's lines, what the daemon says of it.
        self.assertFalse([line for line in host_lines if "starting on" in line
                          or "Port" in line], host_lines)

    def test_daemon_status_shows_the_host_and_its_sessions(self) -> None:
        async def go() -> tuple[dict[str, Any], str]:
            async with self.server("--read-only") as s:
                facts = await self.call(s, "status")
                shown = subprocess.run(
                    [sys.executable, "-m", "hyperdaemon", "daemon", "status"], env=self.env,
                    capture_output=True, text=True, timeout=QUICK, check=True).stdout
                return facts, shown

        facts, shown = self.drive(go())
        host_line = next(line for line in shown.splitlines() if "mcp host" in line)
        self.assertIn(f"pid {facts['host_pid']} (ready), 1 sessions, RSS ", host_line)
        self.assertIn(f"launcher pid {launcher_pid(facts)} ", shown)
        self.assertIn(" read-only ephemeral " + facts["ephemeral_db"], shown)

    def test_the_warm_launcher_imports_only_the_standard_library(self) -> None:
        async def go() -> None:
            async with self.server() as s:  # the daemon and its host are running now
                await self.call(s, "status")
            log = self.tmp / "importtime.log"
            with open(log, "w") as errlog:
                async with self.launcher("-X", "importtime", errlog=errlog) as s:
                    self.assertEqual((await self.call(s, "status"))["served_by"], "mcp host")

        self.drive(go())
        imported = {line.split("|")[-1].strip().split(".")[0]
                    for line in (self.tmp / "importtime.log").read_text().splitlines()
                    if line.startswith("import time:")}
        self.assertIn("hyperdaemon", imported)
        self.assertEqual(imported & set(HEAVY), set())

    def warm_imports(self, flags: tuple[str, ...] = ()) -> set[str]:
        """The modules a launcher started with C{flags} imports, the daemon and host running."""
        async def go() -> None:
            async with self.server() as s:  # the daemon and its host are running now
                await self.call(s, "status")
            with open(self.tmp / "importtime.log", "w") as errlog:
                async with self.launcher("-X", "importtime", errlog=errlog, flags=flags) as s:
                    self.assertEqual((await self.call(s, "status"))["served_by"], "mcp host")

        self.drive(go())
        return {line.split("|")[-1].strip()
                for line in (self.tmp / "importtime.log").read_text().splitlines()
                if line.startswith("import time:")}

    def test_the_warm_launcher_imports_neither_the_parser_nor_socket_and_signal(self) -> None:
        # The parser and what it loads cost more than the rest of the
        # launcher's start; the wrappers' enum and selectors, a sixth of it.
        imported = self.warm_imports(("--read-only", "--persistent-db", str(self.tmp / "p.hyper")))
        self.assertIn("hyperdaemon.mcp.launcher", imported)
        self.assertEqual(imported & set(SLOW_STANDARD + WRAPPERS), set())

    def test_two_assistants_share_persistent_data_and_not_scratch(self) -> None:
        async def go() -> None:
            async with self.server() as a, self.server() as b:
                fa, fb = await self.call(a, "status"), await self.call(b, "status")
                self.assertEqual(fa["host_pid"], fb["host_pid"])
                self.assertNotEqual(fa["ephemeral_db"], fb["ephemeral_db"])
                await self.call(a, "execute", sql=["CREATE TABLE mine (x int)"])
                await self.call(a, "execute", sql=["CREATE TABLE shared (x int)",
                                                   "INSERT INTO shared VALUES (7)"],
                                database="persistent")
                rows = await self.call(b, "query", sql="SELECT x FROM persistent.public.shared")
                self.assertEqual(rows["rows"], [[7]])
                with self.assertRaises(ToolCallError):
                    await self.call(b, "query", sql="SELECT * FROM mine")
                self.assertEqual((await self.call(a, "query", sql="SELECT count(*) FROM mine"))
                                 ["rows"], [[0]])

        self.drive(go())

    def test_sigkill_of_a_launcher_ends_its_session(self) -> None:
        seen: list[dict[str, Any]] = []

        async def go() -> None:
            async with self.server() as s:
                seen.append(await self.call(s, "status"))
                os.kill(launcher_pid(seen[0]), signal.SIGKILL)
                wait_for(lambda: not pid_alive(launcher_pid(seen[0])), QUICK,
                         "the launcher to die")

        try:
            self.drive(go())
        except BaseException:
            pass  # the client may see its server die
        facts = seen[0]
        self.assertTrue(Path(facts["ephemeral_db"]).parent.name.startswith(
            f"{launcher_pid(facts)}-"))
        folder = Path(facts["ephemeral_db"]).parent
        wait_for(lambda: not folder.exists(), QUICK, "the killed launcher's folder to go")
        wait_for(lambda: self.daemon_facts()["sessions"] == []
                 and self.daemon_facts()["mcp_host"]["sessions"] == [], QUICK,
                 "the daemon and the host to drop the session")

    def _recovers_from_killing(self, victim: str) -> None:
        async def go() -> tuple[dict[str, Any], dict[str, Any]]:
            async with self.server() as s:
                before = await self.call(s, "status")
                await self.call(s, "execute", sql=["CREATE TABLE kept (x int)",
                                                   "INSERT INTO kept VALUES (1)"],
                                database="persistent")
                await self.call(s, "execute", sql=["CREATE TABLE scratch (x int)",
                                                   "INSERT INTO scratch VALUES (2)"])
                daemon = self.daemon_facts()
                pid = daemon["mcp_host"]["pid"] if victim == "host" else daemon["pid"]
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not pid_alive(pid), QUICK, f"the {victim} to die")
                outcome = None
                for _ in range(3):
                    try:
                        outcome = await self.call(s, "query", sql="SELECT x FROM "
                                                  "persistent.public.kept")
                        break
                    except ToolCallError:
                        raise
                    except Exception as e:  # the JSON-RPC error that says to retry
                        self.assertIn("send it again", str(e))
                self.assertEqual(outcome["rows"], [[1]])
                # The scratch database is the launcher's: attached again.
                self.assertEqual((await self.call(s, "query", sql="SELECT x FROM scratch"))
                                 ["rows"], [[2]])
                after = await self.call(s, "status")
                self.assertTrue(pid_alive(launcher_pid(before)))
                return before, after

        before, after = self.drive(go())
        self.assertEqual(launcher_pid(before), launcher_pid(after))
        self.assertEqual(before["ephemeral_db"], after["ephemeral_db"])
        self.assertNotEqual(before["host_pid"], after["host_pid"])
        self.assertEqual(after["served_by"], "mcp host")

    def test_sigkill_of_the_host_the_launcher_reconnects(self) -> None:
        self._recovers_from_killing("host")

    def test_sigkill_of_the_daemon_the_launcher_reconnects(self) -> None:
        self._recovers_from_killing("daemon")

    def test_a_dead_hosts_session_goes_once_its_launcher_dies_too(self) -> None:
        seen: list[dict[str, Any]] = []

        async def go() -> None:
            async with self.server() as s:
                seen.append(await self.call(s, "status"))
                host = seen[0]["host_pid"]
                # The launcher stopped (so that it cannot reconnect), the
                # host killed: the daemon keeps the database while the
                # launcher lives, and drops it once it is gone.
                os.kill(launcher_pid(seen[0]), signal.SIGSTOP)
                os.kill(host, signal.SIGKILL)
                wait_for(lambda: not pid_alive(host), QUICK, "the host to die")
                folder = Path(seen[0]["ephemeral_db"]).parent
                wait_for(lambda: self.daemon_facts()["sessions"] == [], QUICK,
                         "the daemon to see the session end")
                self.assertTrue(folder.exists())
                os.kill(launcher_pid(seen[0]), signal.SIGKILL)
                wait_for(lambda: not folder.exists(), QUICK, "the folder to go")

        try:
            self.drive(go())
        except BaseException as e:
            if not seen or "AssertionError" in repr(e) or "FailTest" in repr(e):
                raise
        self.assertFalse(Path(seen[0]["ephemeral_db"]).parent.exists())

    def test_another_user_cannot_use_the_host(self) -> None:
        async def go() -> dict[str, Any]:
            async with self.server() as s:
                await self.call(s, "status")
                return self.daemon_facts()

        path = self.drive(go())["mcp_host"]["socket"]
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(self.state).st_mode & 0o777, 0o700)

        def connect(where: str = path) -> str:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(QUICK)
                try:
                    sock.connect(where)
                except PermissionError:
                    return "denied"
                try:
                    sock.sendall(json.dumps({"pid": os.getpid(), "cwd": "/"}).encode() + b"\n")
                except OSError:
                    pass  # the host may have said no and closed already
                answer = sock.makefile("rb").readline()
                return json.loads(answer).get("error", "served")

        self.assertEqual(run_as(NOBODY, connect), "denied")
        # Even with the socket opened to everyone (linked into an open
        # folder), the host asks the kernel who connected and says no.
        opened = Path(tempfile.mkdtemp(dir="/tmp"))
        try:
            opened.chmod(0o755)
            os.link(path, opened / "sock")
            os.chmod(path, 0o666)
            self.assertEqual(run_as(NOBODY, lambda: connect(str(opened / "sock"))),
                             "this MCP host serves only its own user")
        finally:
            os.chmod(path, 0o600)
            shutil.rmtree(opened)
        self.assertEqual(self.daemon_facts()["mcp_host"]["sessions"], [])

    def test_no_daemon_serves_in_process(self) -> None:
        async def go() -> dict[str, Any]:
            async with self.server("--no-daemon") as s:
                self.assertEqual((await self.call(s, "query", sql="SELECT 1"))["rows"], [[1]])
                return await self.call(s, "status")

        facts = self.drive(go())
        self.assertEqual((facts["mode"], facts["served_by"]), ("private hyperd", "in-process"))
        self.assertFalse((self.state / "mcp-host.sock").exists())

    def test_a_host_that_cannot_start_leaves_the_launcher_serving_in_process(self) -> None:
        # Something that is not a socket where the host's socket goes: every
        # host exits at once, and past its budget the daemon gives up.
        (self.state / "mcp-host.sock").mkdir(parents=True)
        self.state.chmod(0o700)

        async def go() -> dict[str, Any]:
            async with self.server() as s:
                self.assertEqual((await self.call(s, "query", sql="SELECT 5"))["rows"], [[5]])
                return await self.call(s, "status")

        facts = self.drive(go())
        self.assertEqual((facts["mode"], facts["served_by"]), ("daemon", "in-process"))
        self.assertEqual(self.daemon_facts()["mcp_host"]["state"], "failed")

    def test_many_launchers_at_once_share_one_host(self) -> None:
        count = 50

        async def one(index: int) -> dict[str, Any]:
            async with self.server() as s:
                rows = await self.call(s, "query", sql=f"SELECT {index}")
                self.assertEqual(rows["rows"], [[index]])
                return await self.call(s, "status")

        async def go() -> list[dict[str, Any]]:
            return await asyncio.gather(*(one(i) for i in range(count)))

        facts = asyncio.run(asyncio.wait_for(go(), READY_TIMEOUT * 5))
        self.assertEqual({f["served_by"] for f in facts}, {"mcp host"})
        self.assertEqual(len({f["host_pid"] for f in facts}), 1)
        self.assertEqual(len({f["ephemeral_db"] for f in facts}), count)
        wait_for(lambda: self.daemon_facts()["sessions"] == [], QUICK * 2,
                 "every session to end")


class FallbackTests:
    def test_the_upstream_daemon_has_no_host_so_the_launcher_serves_itself(
            self, monkeypatch: Any, tmp_path: Path) -> None:
        from hyperdaemon.client.finder import DaemonAddress, Finder
        from hyperdaemon.mcp import launcher

        upstream = DaemonAddress(port=1, version="0.7.3", session_protocol=None, facts={})
        monkeypatch.setattr(Finder, "ensure", lambda self: upstream)
        environ = {"HYPERDB_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)}
        with pytest.raises(launcher.NoHost, match="upstream"):
            launcher.cold_start({"ephemeral_only": True}, environ)


class SettingsTests:
    """The launcher's settings line and what the host makes of it."""

    def test_the_host_takes_the_launchers_settings(self) -> None:
        from hyperdaemon.mcp.host import LauncherSettings

        line = json.dumps({"pid": 12, "cwd": "/w", "read_only": True, "ephemeral_only": False,
                           "persistent_db": "/w/p.hyper",
                           "environ": {"HYPERDB_DAEMON_PORT": "7", "SECRET_TOKEN": "x"}})
        settings = LauncherSettings.parse(line.encode())
        assert settings == LauncherSettings(pid=12, cwd="/w", read_only=True,
                                            persistent_db="/w/p.hyper",
                                            environ={"HYPERDB_DAEMON_PORT": "7"})
        again = json.dumps({"pid": 12, "cwd": "/w", "ephemeral_db": "/s/12-a/scratch.hyper"})
        assert LauncherSettings.parse(again.encode()).ephemeral_db == "/s/12-a/scratch.hyper"

    @pytest.mark.parametrize("fields, problem", [
        ({"cwd": "/"}, "pid"),
        ({"pid": 0, "cwd": "/"}, "pid"),
        ({"pid": 1, "cwd": "relative"}, "cwd"),
        ({"pid": 1, "cwd": "/", "persistent_db": "p.hyper"}, "persistent_db"),
        ({"pid": 1, "cwd": "/", "read_only": "yes"}, "read_only"),
        ({"pid": 1, "cwd": "/", "environ": {"A": 1}}, "environ"),
        ({"pid": 1, "cwd": "/", "ephemeral_db": "x.hyper"}, "ephemeral_db"),
    ])
    def test_the_host_refuses_unusable_settings(self, fields: dict[str, Any],
                                                problem: str) -> None:
        from hyperdaemon.mcp.host import LauncherSettings

        with pytest.raises(ValueError, match=problem):
            LauncherSettings.parse(json.dumps(fields).encode())

    def test_the_launcher_resolves_paths_as_the_library_does(self, tmp_path: Path,
                                                             monkeypatch: Any) -> None:
        from hyperdaemon import config
        from hyperdaemon.client.session import default_persistent_db
        from hyperdaemon.daemon.mcphost import SOCKET_NAME
        from hyperdaemon.mcp import host, launcher

        monkeypatch.chdir(tmp_path)
        assert launcher.SOCKET_NAME == SOCKET_NAME
        assert launcher.PASSED_VARIABLES == host.PASSED_VARIABLES
        for environ in ({"HOME": "/h"}, {"HOME": "/h", "HYPERDB_STATE_DIR": "~/s"},
                        {"HOME": "/h", "HYPERDB_STATE_DIR": "rel"},
                        {"HOME": "/h", "XDG_DATA_HOME": "/x"},
                        {"HOME": "/h", "HYPERDB_PERSISTENT_DB": "p.hyper"}):
            monkeypatch.setenv("HOME", "/h")
            assert launcher.state_dir(environ) == str(config.state_dir(None, environ)), environ
            assert launcher.persistent_db({}, environ) == str(default_persistent_db(environ))
        assert launcher.persistent_db({"ephemeral_only": True}, {}) is None
        assert launcher.persistent_db({"persistent_db": "x.hyper"}, {}) == str(tmp_path / "x.hyper")

    @pytest.mark.parametrize("value", [
        {"pid": 12, "cwd": "/w é\"\\\n", "read_only": True, "ephemeral_only": False,
         "persistent_db": None, "environ": {"HOME": "/h\udcff", "X": "\u2603\U0001f600"}},
        {}, {"environ": {}}, {"n": -3},
    ])
    def test_the_settings_line_is_the_json_the_json_package_writes(self, value: Any) -> None:
        from hyperdaemon.mcp.launcher import json_text

        assert json_text(value) == json.dumps(value, separators=(",", ":"))

    def test_the_settings_line_holds_only_what_it_can_write(self) -> None:
        from hyperdaemon.mcp.launcher import json_text

        with pytest.raises(TypeError, match="float"):
            json_text({"x": 1.5})

    @pytest.mark.parametrize("argv", [
        [], ["--read-only"], ["--no-daemon", "--ephemeral-only"],
        ["--persistent-db", "p.hyper", "--read-only"], ["--persistent-db=/a b.hyper"],
        ["--persistent-db", ""], ["--persistent-db", "a.hyper", "--persistent-db", "b.hyper"],
    ])
    def test_the_launchers_command_line_reads_as_the_full_parser_does(
            self, argv: list[str]) -> None:
        from hyperdaemon.cli import build_parser
        from hyperdaemon.mcp.launcher import launcher_options

        assert launcher_options(argv) == vars(build_parser().parse_args(argv))

    @pytest.mark.parametrize("argv", [
        ["daemon"], ["daemon", "status"], ["--help"], ["--version"], ["--read"],
        ["--persistent-db"], ["--persistent-db", "--read-only"], ["--", "x"], ["-x"],
    ])
    def test_any_other_command_line_is_left_to_the_full_parser(self, argv: list[str]) -> None:
        from hyperdaemon.mcp.launcher import launcher_options

        assert launcher_options(argv) is None

    def test_the_command_lines_the_full_parser_refuses_are_refused_as_before(self) -> None:
        run = subprocess.run([sys.executable, "-m", "hyperdaemon", "--persistent-db"],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2
        assert run.stderr == ("hyperdb-mcp: argument --persistent-db: expected one argument "
                              "(see 'hyperdb-mcp --help')\n")


def test_the_host_finds_its_daemon_once_for_all_its_sessions(tmp_path: Path,
                                                             monkeypatch: Any) -> None:
    from hyperdaemon.client.finder import DaemonAddress, Finder
    from hyperdaemon.config import PortChoice
    from hyperdaemon.mcp.host import HostFinder

    asked = []
    address = DaemonAddress(port=7, version="1", session_protocol=3, facts={})
    monkeypatch.setattr(Finder, "ensure", lambda finder: asked.append(finder) or address)
    finder = HostFinder(tmp_path, PortChoice(7, 7, 7), environ={})
    assert [finder.ensure(), finder.ensure()] == [address, address]
    assert asked == [finder]


def test_the_launcher_talks_only_to_a_host_of_its_own_user(monkeypatch: Any) -> None:
    from hyperdaemon.mcp import launcher

    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        path = str(folder / launcher.SOCKET_NAME)
        with socket.socket(socket.AF_UNIX) as listening:
            listening.bind(path)
            listening.listen()
            own = launcher.connect(path)
            assert own is not None
            own.close()
            # The same socket, as seen by a launcher of another uid.
            monkeypatch.setattr(os, "getuid", lambda: os.geteuid() + 1)
            assert launcher.connect(path) is None
    finally:
        shutil.rmtree(folder)


@pytest_twisted.ensureDeferred
async def test_a_stopped_host_has_removed_its_socket() -> None:
    from twisted.internet import reactor

    from hyperdaemon.mcp.host import McpHost

    state = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        host = McpHost(reactor, state, daemon_port=1)
        host.listen()
        assert host.socket_path.exists()
        await host.stop()
        assert not host.socket_path.exists()
    finally:
        shutil.rmtree(state)


@pytest.mark.parametrize(("line", "expected"), [
    (b'{"jsonrpc":"2.0","id":7,"result":{"rows":[[1]]}}', 7),
    (b'{"jsonrpc":"2.0","id":"a,\\"b","error":{"code":-1,"message":"x"}}', 'a,"b'),
    # A result is not parsed: even one that is not JSON is matched by its id.
    (b'{"jsonrpc":"2.0","id":3,"result":' + b"x" * 1000, 3),
    # Nor does text that is not ASCII right after the id stand in the way.
    (b'{"jsonrpc":"2.0","id":4,"result":{"text":"' + "東京".encode() * 100 + b'"}}', 4),
])
def test_the_launcher_reads_the_id_a_host_line_answers_from_its_first_bytes(
        line: bytes, expected: Any) -> None:
    from hyperdaemon.mcp.launcher import answered_id

    assert answered_id(line) == expected


@pytest.mark.parametrize("line", [
    b'{"jsonrpc":"2.0","method":"notifications/progress","params":{}}',
    b'{"jsonrpc":"2.0","id":9,"method":"sampling/createMessage","params":{}}',
])
def test_a_host_line_that_answers_nothing_is_told_apart(line: bytes) -> None:
    from hyperdaemon.mcp.launcher import NOT_AN_ANSWER, answered_id

    assert answered_id(line) is NOT_AN_ANSWER


@pytest.mark.parametrize("line", [
    b'{"id":1,"jsonrpc":"2.0","result":{}}',  # another order: parsed in full
    b'{"jsonrpc":"2.0","id":"\xc3\xa9","result":{}}',  # not ASCII
    b'{"jsonrpc":"2.0","id":true,"result":{}}',
    b'{"jsonrpc":"2.0","id":' + b"1" * 300 + b',"result":{}}',
    b'not json at all',
])
def test_a_host_line_the_launcher_cannot_read_quickly_is_left_to_the_parser(
        line: bytes) -> None:
    from hyperdaemon.mcp.launcher import answered_id

    assert answered_id(line) is None


def test_the_relay_forgets_a_request_once_answered_and_swallows_the_replayed_one() -> None:
    from hyperdaemon.mcp.launcher import Relay

    relay = Relay(socket.socket(socket.AF_UNIX), {}, b"", {}, {})
    try:
        relay.in_flight = {"1": 1, '"x"': "x", "2": 2}
        assert relay._from_host_line(b'{"jsonrpc":"2.0","id":1,"result":{}}')
        assert relay._from_host_line(b'{"id":"x","jsonrpc":"2.0","result":{}}')  # parsed
        assert relay._from_host_line(b'{"jsonrpc":"2.0","id":2,"method":"ping"}')
        assert relay.in_flight == {"2": 2}
        relay._swallow = "5"
        assert not relay._from_host_line(b'{"jsonrpc":"2.0","id":5,"result":{}}')
        assert relay._swallow is None
    finally:
        relay.sock.close()
        os.close(relay._wake_r)
        os.close(relay._wake_w)


DATA = b'"' + b"x" * 70_000 + b'"'


@pytest.mark.parametrize(("line", "expected"), [
    # The Python SDK's order: the id first.
    (b'{"jsonrpc":"2.0","id":12,"method":"tools/call","params":{"data":' + DATA + b"}}",
     ("tools/call", 12)),
    # The method first, the id last (as a JavaScript client builds it).
    (b'{"method":"tools/call","params":{"data":' + DATA + b'},"jsonrpc":"2.0","id":"r-7"}\r',
     ("tools/call", "r-7")),
    (b'{"jsonrpc":"2.0","method":"tools/call","params":{"data":' + DATA + b'},"id":3}',
     ("tools/call", 3)),
    # Rows that are not ASCII right after the method, and before the id.
    (b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"data":"'
     + "Zoë,Łódź\n".encode() * 10_000 + b'"}}', ("tools/call", 5)),
    (b'{"method":"tools/call","params":{"data":"' + "Zoë\n".encode() * 20_000
     + 'é"},"jsonrpc":"2.0","id":6}'.encode(), ("tools/call", 6)),
])
def test_the_launcher_reads_a_long_requests_method_and_id_from_its_ends(
        line: bytes, expected: Any) -> None:
    from hyperdaemon.mcp.launcher import request_head

    assert request_head(line) == expected


@pytest.mark.parametrize("line", [
    # An id inside the params, at the end: not the request's.
    b'{"method":"tools/call","params":{"data":' + DATA + b',"id":3}}',
    b'{"method":"tools/call","params":[{"id":3}]}',
    # No id at either end (a notification, or an id in the middle): parse it.
    b'{"jsonrpc":"2.0","method":"notifications/x","params":{"data":' + DATA + b"}}",
    b'{"jsonrpc":"2.0","method":"x","id":4,"params":{"data":' + DATA + b"}}",
    b'{"params":{},"jsonrpc":"2.0","id":1,"method":"x"}',
    b'{"jsonrpc":"2.0","id":1,"result":{}}',
])
def test_a_request_whose_ends_do_not_say_for_sure_is_left_to_the_parser(line: bytes) -> None:
    from hyperdaemon.mcp.launcher import request_head

    assert request_head(line) is None


def test_the_relay_tracks_a_long_request_without_parsing_it() -> None:
    from hyperdaemon.mcp.launcher import Relay

    relay = Relay(socket.socket(socket.AF_UNIX), {}, b"", {}, {})
    try:
        # Not JSON between its ends: only the ends were read.
        relay._note_from_client(b'{"jsonrpc":"2.0","id":9,"method":"tools/call","params":'
                                + b"not json " * 10_000 + b"}")
        relay._note_from_client(b'{"jsonrpc":"2.0","id":10,"method":"tools/list"}')
        assert relay.in_flight == {"9": 9, "10": 10}
    finally:
        relay.sock.close()
        os.close(relay._wake_r)
        os.close(relay._wake_w)


@pytest.mark.parametrize("first", [b"HELLO 1234\n", b"PORT x\n", b"P" * 100])
def test_a_host_waiting_for_its_port_exits_on_any_other_first_line(
        tmp_path: Path, first: bytes) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    host = subprocess.run([sys.executable, "-m", "hyperdaemon.mcp.host", "--state-dir",
                           str(state)], input=first, capture_output=True, timeout=READY_TIMEOUT)
    assert host.returncode == 1
    assert b"is not 'PORT <n>'" in host.stderr
    assert b"READY" not in host.stdout
    assert not (state / "mcp-host.sock").exists()
