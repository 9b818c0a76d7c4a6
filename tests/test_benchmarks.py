"""
The benchmarks run end to end (C{python -m benchmarks --quick}, ours alone):
they finish, and every measure yields numbers.  Their values are the
benchmarks' business, never the tests'.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from numbers import Real
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180.0
MEASURES = set(range(1, 10))


class QuickBenchmarkTests:
    @pytest.fixture(autouse=True)
    def _tmp(self) -> Iterator[None]:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-test-"))
        yield
        shutil.rmtree(self.tmp, True)

    def run_benchmarks(self, *args: str) -> tuple[int, str]:
        env = dict(os.environ, HYPERDB_PEER_DIR=str(self.tmp / "no-such-peer"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks", *args], cwd=ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            out, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            # SIGTERM first: the benchmarks then stop every process they started.
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            pytest.fail(f"the benchmarks took more than {TIMEOUT:g} s:\n"
                        + out.decode("utf-8", "replace"))
        return proc.returncode, out.decode("utf-8", "replace")

    def test_quick_run_gives_a_number_for_every_measure(self) -> None:
        results = self.tmp / "r.json"
        code, output = self.run_benchmarks("--quick", "--json", str(results))
        assert code == 0, output
        document = json.loads(results.read_text())
        figures = document["figures"]
        assert {f["measure"] for f in figures} == MEASURES, output
        for figure in figures:
            summary = figure["ours"]
            assert isinstance(summary, dict), f"{figure['key']} has no value:\n{output}"
            assert isinstance(summary["median"], Real), figure["key"]
            assert isinstance(summary["min"], Real), figure["key"]
            assert isinstance(summary["max"], Real), figure["key"]
