"""
A client process for tests: opens a session through the daemon (spawning it
if needed), runs the statements given, prints one JSON line of facts, then
either closes at once or holds the session until its stdin closes.

    python client_program.py [--hold] [--no-daemon] [--name N] [SQL ...]
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import defer, task
from twisted.internet.stdio import StandardIO
from twisted.protocols.basic import LineReceiver

from hyperdaemon.client.session import Session


class _UntilEOF(LineReceiver):
    def __init__(self, done: defer.Deferred[None]) -> None:
        self.done = done

    def lineReceived(self, line: bytes) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        if not self.done.called:
            self.done.callback(None)


async def main(reactor: object, argv: list[str]) -> None:
    hold = "--hold" in argv
    no_daemon = "--no-daemon" in argv
    name = "test-client"
    if "--name" in argv:
        name = argv[argv.index("--name") + 1]
    statements = [a for a in argv if not a.startswith("--") and a != name]
    session = await Session.open(reactor, name=name, no_daemon=no_daemon)
    results = []
    for sql in statements:
        if sql.lstrip().upper().startswith("SELECT"):
            results.append((await session.query(sql)).rows)
        else:
            results.append(await session.execute(sql))
    link = getattr(session._source, "address", None)
    print(json.dumps({
        "pid": os.getpid(),
        "ephemeral_db": str(session.ephemeral_db),
        "daemon_port": link.port if link else None,
        "daemon_pid": link.facts.get("pid") if link else None,
        "hyperd_endpoint": f"{session.credentials.host}:{session.credentials.port}",
        "results": results,
    }, default=str), flush=True)
    if hold:
        done: defer.Deferred[None] = defer.Deferred()
        StandardIO(_UntilEOF(done))
        await done
    await session.close()


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))
