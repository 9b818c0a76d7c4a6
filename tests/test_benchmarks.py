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


def parts(clients: float, host: float, total: float, sessions: int) -> dict:
    """Measure 7's parts of one run, as _rss_parts gives them (MB)."""
    return {"sessions": sessions, "private": {"clients": clients, "mcp host": host},
            "pss": {"clients": clients, "mcp host": host}, "pss_total": total}


@pytest.fixture
def benchmarks_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks package, from the checkout (it is not installed)."""
    monkeypatch.syspath_prepend(str(ROOT))


def test_an_assistant_costs_its_process_and_what_the_host_grows_by(
        benchmarks_importable: None) -> None:
    from benchmarks.measures import per_assistant

    # Eight launchers of 5 MB; the host grows from 80 to 87 MB as 7 more come.
    each = per_assistant(parts(5, 80, 300, 1), parts(40, 87, 380, 8))
    assert each["private"] == pytest.approx(5 + 1)
    assert each["host_private_per_session"] == pytest.approx(1)
    # The whole machine: 300 MB with one, 380 with eight: 80/7 MB more each.
    assert each["pss_per_session"] == pytest.approx(80 / 7)
    assert each["pss_fixed"] == pytest.approx(300 - 80 / 7)


def test_the_crossover_is_where_the_saving_per_assistant_repays_the_base(
        benchmarks_importable: None) -> None:
    from benchmarks.measures import crossover

    ours = {"pss_fixed": 240.0, "pss_per_session": 6.0}
    theirs = {"pss_fixed": 160.0, "pss_per_session": 8.0}
    # 80 MB more to start with, 2 MB saved per assistant: less from the 41st.
    assert crossover(ours, theirs) == 41
    assert crossover(dict(ours, pss_fixed=150.0), theirs) == 1
    assert crossover(dict(ours, pss_per_session=8.0), theirs) == float("inf")
