"""
Progress notifications of long tool calls (L{hyperdaemon.mcp.progress}):
the steps of a load and an export through the SDK's stdio client, and the
heartbeat of a step that lasts, on its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mcp_support import McpTestCase

from hyperdaemon.mcp.progress import Progress, Reported

#: Rows of the "long" file: some seconds of loading on a busy machine.
LONG_ROWS = 300_000


class ProgressTests(McpTestCase):
    def test_a_long_load_file_and_its_export_send_progress(self) -> None:
        big = self.tmp / "big.csv"
        with open(big, "w") as f:
            f.write("id,name,amount,day\n")
            for i in range(LONG_ROWS):
                f.write(f"{i},name {i % 1000},{i * 0.25},2024-01-{i % 28 + 1:02d}\n")

        async def go() -> tuple[list[Any], Any, list[Any], list[Any]]:
            loading: list[Any] = []
            exporting: list[Any] = []

            async def on_load(progress: float, total: float | None, message: str | None) -> None:
                loading.append((progress, total, message))

            async def on_export(progress: float, total: float | None,
                                message: str | None) -> None:
                exporting.append((progress, total, message))

            async with self.server() as session:
                loaded = await session.call_tool(
                    "load_file", {"table": "big", "path": str(big)}, progress_callback=on_load)
                exported = await session.call_tool(
                    "export", {"table": "big", "format": "parquet",
                               "path": str(self.tmp / "big.parquet")},
                    progress_callback=on_export)
                # Without a token, nothing is sent and the call works.
                quiet = await session.call_tool("export", {
                    "table": "big", "format": "csv", "path": str(self.tmp / "big.csv.out")})
            return loading, (loaded, exported, quiet), exporting, []

        loading, results, exporting, _ = self.drive(go())
        for result in results:
            self.assertFalse(result.is_error, result.content[0].text)
        values = [p for p, _, _ in loading]
        self.assertEqual(values, sorted(set(values)))  # growing, each once
        steps = [(p, t, m) for p, t, m in loading if p == int(p)]
        self.assertEqual([(p, t) for p, t, _ in steps], [(0, 3), (1, 3), (2, 3)])
        self.assertIn("waiting for the session", steps[0][2])
        self.assertIn("reading the rows of", steps[1][2])
        self.assertIn("putting the rows in big", steps[2][2])
        self.assertEqual([(p, t) for p, t, _ in exporting], [(0, 2), (1, 2)])
        self.assertIn("big.parquet", exporting[1][2])


class HeartbeatTests:
    def test_a_lasting_step_is_repeated_growing_with_its_time(self) -> None:
        sent: list[tuple[float, float | None, str]] = []
        now = [100.0]

        async def send(progress: float, total: float | None, message: str) -> None:
            sent.append((progress, total, message))

        async def go() -> None:
            progress = Reported(asyncio.get_running_loop(), send, clock=lambda: now[0])
            running = asyncio.ensure_future(progress.run())
            progress.step(1, 3, "reading")
            await asyncio.sleep(0)
            now[0] += 4
            progress.beat()
            now[0] += 2
            progress.beat()
            progress.step(2, 3, "putting")
            progress.step(3, 3, "done")
            progress.beat()  # the last step is not repeated
            progress.close()
            await running

        asyncio.run(go())
        assert sent == [(1, 3, "reading"), (1.5, 3, "reading (4 s so far)"),
                        (1.75, 3, "reading (6 s so far)"), (2, 3, "putting"), (3, 3, "done")]

    def test_progress_never_goes_back(self) -> None:
        sent: list[float] = []

        async def send(progress: float, total: float | None, message: str) -> None:
            sent.append(progress)

        async def go() -> None:
            progress = Reported(asyncio.get_running_loop(), send)
            running = asyncio.ensure_future(progress.run())
            progress.step(1, None, "a")
            progress.beat()  # 1.5, queued before the next step
            progress.step(1, None, "a again")
            progress.step(2, None, "b")
            progress.close()
            await running

        asyncio.run(go())
        assert sent == [1, 1.5, 2]

    def test_without_a_token_progress_sends_nothing(self) -> None:
        from hyperdaemon.mcp.progress import current_progress

        progress = current_progress()
        assert type(progress) is Progress
        progress.step(1, 2, "nothing to tell")
