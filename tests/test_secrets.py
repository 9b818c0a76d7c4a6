"""
Secrets never reach a log: not the user's environment, not hyperd's
password, wherever the MCP server, the daemon or hyperd write.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

from support import QUICK, status, wait_for
from mcp_support import McpTestCase

TOKEN = "planted-token-6f1d0c9a5e"


def _logs(root: Path) -> dict[Path, bytes]:
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.name.endswith(".hyper"):
            found[path] = path.read_bytes()
    return found


class SecretsTests(McpTestCase):
    def test_no_log_holds_the_environment_or_the_hyperd_password(self) -> None:
        self.env["MY_API_TOKEN"] = TOKEN
        passwords = []

        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "query", sql="SELECT 1")
                record = json.loads((self.state / "daemon.json").read_text())
                passwords.append(record["hyperd_password"])
                # The daemon dies: the server finds a new one, retrying
                # (and logging) until it is up.
                os.kill(record["pid"], signal.SIGKILL)
                await asyncio.to_thread(
                    wait_for, lambda: not (self.state / "daemon.json").exists()
                    or json.loads((self.state / "daemon.json").read_text())["pid"]
                    != record["pid"], QUICK, "the old daemon to be gone")
                result = await self.call(s, "query", sql="SELECT 2")
                assert result["rows"] == [[2]]
                passwords.append(json.loads((self.state / "daemon.json").read_text())
                                 ["hyperd_password"])
                assert status(self.ports[0])["state"] == "ready"

        self.drive(go())
        logs = _logs(self.state / "logs")
        logs[self.tmp / "server-stderr.log"] = (self.tmp / "server-stderr.log").read_bytes()
        # The retry path that once logged the environment was taken: the
        # in-process server's, or the launcher's (its host died with the
        # daemon), whose new host's session found the new daemon.
        assert (b"Scheduling retry" in logs[self.tmp / "server-stderr.log"]
                or b"MCP host went away" in logs[self.tmp / "server-stderr.log"])
        for secret in [TOKEN, *passwords]:
            assert secret
            leaks = [str(path) for path, text in logs.items() if secret.encode() in text]
            assert leaks == [], f"a secret is in {leaks}"
