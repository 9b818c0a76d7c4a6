"""
Progress of long tool calls, as MCP progress notifications.

When a client sends a C{progressToken} with C{tools/call}, the call gets a
L{Progress} (L{current_progress}, read on the event loop's thread when the
tool starts, before its work goes to the session's worker thread): the work
reports its steps with C{progress.step(done, total, message)} from any
thread, and each becomes a C{notifications/progress}.  While a step lasts,
a heartbeat repeats it every L{HEARTBEAT_INTERVAL} seconds with the time
spent (the progress creeping towards the next step, as the protocol wants
it to grow), so that a client which resets its timeout on progress waits
for a long load.  Every notification is sent before the call's result.
Without a token, L{current_progress} is a L{Progress} that sends nothing.

Tools use it as:

    progress = current_progress()          # when the tool is called
    def work(conn):
        progress.step(1, 3, "reading the rows")
        ...
"""

import contextvars
import threading
import time
from typing import Any, Callable

#: Seconds between repeats of a step that lasts.
HEARTBEAT_INTERVAL = 2.0


class Progress:
    """
    The steps of one call, sent to the client in order; L{step} may be
    called from any thread.  This base class sends nothing.
    """

    def step(self, done: float, total: float | None, message: str) -> None:
        """C{done} of C{total} steps are done; C{message} says what happens now."""


_current: contextvars.ContextVar[Progress] = contextvars.ContextVar("progress",
                                                                   default=Progress())


def current_progress() -> Progress:
    """The L{Progress} of the tool call under way (read it on the event loop's thread)."""
    return _current.get()


class Reported(Progress):
    """
    A L{Progress} that hands each step to C{send(progress, total, message)},
    an async function, on C{loop}, one at a time and in order.
    """

    def __init__(self, loop: Any, send: Callable[[float, float | None, str], Any],
                 clock: Callable[[], float] = time.monotonic) -> None:
        import asyncio

        self._loop = loop
        self._send = send
        self._clock = clock
        self._queue: asyncio.Queue[tuple[float, float | None, str] | None] = asyncio.Queue()
        self._lock = threading.Lock()
        self._last: tuple[float, float | None, str, float] | None = None
        self._beats = 0
        self._sent = -1.0

    def step(self, done: float, total: float | None, message: str) -> None:
        with self._lock:
            self._last = (done, total, message, self._clock())
            self._beats = 0
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (done, total, message))

    def beat(self) -> None:
        """Repeat the step under way with the time it has taken (on the loop's thread)."""
        with self._lock:
            if self._last is None:
                return
            done, total, message, since = self._last
            if total is not None and done >= total:
                return
            self._beats += 1
            # Growing towards the next step, never reaching it.
            value = done + 1 - 0.5 ** self._beats
        elapsed = self._clock() - since
        # Behind the steps already handed over, in order.
        self._loop.call_soon(self._queue.put_nowait,
                             (value, total, f"{message} ({elapsed:.0f} s so far)"))

    async def run(self) -> None:
        """Send the steps until L{close}."""
        while (item := await self._queue.get()) is not None:
            done, total, message = item
            if done <= self._sent:
                continue  # the protocol wants progress to grow
            self._sent = done
            try:
                await self._send(done, total, message)
            except Exception:
                return  # the client went: nothing more to tell it

    def close(self) -> None:
        """Stop L{run} once the steps handed over so far are sent."""
        self._loop.call_soon(self._queue.put_nowait, None)


def register(kit: Any) -> None:
    """No tools: this family reports the progress of the others (see L{serve})."""


def serve(server: Any, kit: Any) -> None:
    """Give every C{tools/call} that carries a progress token its L{Reported} progress."""
    import asyncio

    async def with_progress(ctx: Any, call_next: Any) -> Any:
        if ctx.method != "tools/call" or ctx.request_id is None:
            return await call_next(ctx)
        meta = (ctx.params or {}).get("_meta") or {}
        if meta.get("progressToken") is None:
            return await call_next(ctx)
        loop = asyncio.get_running_loop()
        progress = Reported(loop, ctx.session.report_progress)
        sending = asyncio.ensure_future(progress.run())

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(HEARTBEAT_INTERVAL)
                progress.beat()

        beating = asyncio.ensure_future(heartbeat())
        token = _current.set(progress)
        try:
            return await call_next(ctx)
        finally:
            _current.reset(token)
            beating.cancel()
            progress.close()
            # Every step reaches the client before the result does.
            await sending

    server.middleware.append(with_progress)
