"""
L{hyperdaemon.daemon.liveness}: the verdict on a C{hyperd} that does not answer,
driven by a fake clock and made-up process samples; and the read of
C{/proc}, against real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from hyperdaemon.daemon.liveness import GONE, Liveness, ProcessSample, Verdict, read_process_sample
from support import wait_for

HUNG_AFTER = 30.0
#: How often the supervisor would probe.
INTERVAL = 5.0


def sleeping(cpu: float = 1.0) -> ProcessSample:
    return ProcessSample("S", "SSSS", cpu)


def stopped(cpu: float = 1.0) -> ProcessSample:
    return ProcessSample("T", "TTTT", cpu)


def judged_at_each_interval(clock: Clock, liveness: Liveness, sample_at) -> list[Verdict]:
    """Unanswered probes every INTERVAL until past HUNG_AFTER; their verdicts."""
    verdicts = []
    while clock.seconds() <= HUNG_AFTER + INTERVAL:
        clock.advance(INTERVAL)
        verdicts.append(liveness.unanswered(clock.seconds(), sample_at(clock.seconds())))
    return verdicts


# -- Liveness -----------------------------------------------------------------


def test_a_hyperd_whose_cpu_time_advances_is_busy_and_never_hung() -> None:
    clock = Clock()
    liveness = Liveness(clock.seconds(), hung_after=HUNG_AFTER)
    # Every thread asleep at each look, but 1.5 CPUs' worth of work between.
    verdicts = judged_at_each_interval(clock, liveness, lambda now: sleeping(cpu=1.5 * now))
    assert set(verdicts[1:]) == {Verdict.BUSY}
    assert verdicts[0] is Verdict.SILENT  # nothing to compare the first look with yet


def test_a_running_thread_is_busy_without_an_earlier_sample() -> None:
    liveness = Liveness(0.0, hung_after=HUNG_AFTER)
    assert liveness.unanswered(100.0, ProcessSample("S", "RSSS", 1.0)) is Verdict.BUSY


def test_a_thread_in_disk_wait_is_busy() -> None:
    liveness = Liveness(0.0, hung_after=HUNG_AFTER)
    assert liveness.unanswered(100.0, ProcessSample("S", "DSSS", 1.0)) is Verdict.BUSY


def test_idle_cpu_use_is_not_a_sign_of_life() -> None:
    clock = Clock()
    liveness = Liveness(clock.seconds(), hung_after=HUNG_AFTER)
    # About what an idle hyperd uses: 2 % of a CPU.
    verdicts = judged_at_each_interval(clock, liveness, lambda now: sleeping(cpu=0.02 * now))
    hung_from = int(HUNG_AFTER // INTERVAL) - 1
    assert set(verdicts[:hung_from]) == {Verdict.SILENT}
    assert set(verdicts[hung_from:]) == {Verdict.HUNG}


def test_a_stopped_hyperd_is_stopped_until_hung_after_its_last_answer() -> None:
    clock = Clock()
    liveness = Liveness(clock.seconds(), hung_after=HUNG_AFTER)
    clock.advance(3.0)
    liveness.answered(clock.seconds())
    clock.advance(HUNG_AFTER - 0.25)
    assert liveness.unanswered(clock.seconds(), stopped()) is Verdict.STOPPED
    clock.advance(0.25)
    assert liveness.unanswered(clock.seconds(), stopped()) is Verdict.HUNG


def test_cpu_time_spent_before_a_stop_is_not_a_sign_of_life() -> None:
    liveness = Liveness(0.0, hung_after=HUNG_AFTER)
    liveness.observed(10.0, sleeping(cpu=1.0))
    # It worked hard, then was stopped: the CPU time is from before.
    assert liveness.unanswered(40.0, stopped(cpu=30.0)) is Verdict.HUNG


def test_a_process_that_has_exited_is_gone_at_once() -> None:
    liveness = Liveness(0.0, hung_after=HUNG_AFTER)
    assert liveness.unanswered(0.1, GONE) is Verdict.GONE
    assert liveness.unanswered(0.2, ProcessSample("Z", "Z", 1.0)) is Verdict.GONE


def test_without_proc_only_the_time_since_the_last_answer_counts() -> None:
    liveness = Liveness(0.0, hung_after=HUNG_AFTER)
    assert liveness.unanswered(HUNG_AFTER - 1, None) is Verdict.SILENT
    assert liveness.unanswered(HUNG_AFTER, None) is Verdict.HUNG


def test_an_answer_restarts_the_hung_clock() -> None:
    clock = Clock()
    liveness = Liveness(clock.seconds(), hung_after=HUNG_AFTER)
    clock.advance(HUNG_AFTER - 1)
    assert liveness.unanswered(clock.seconds(), sleeping()) is Verdict.SILENT
    assert liveness.answered(clock.seconds()) is Verdict.ANSWERS
    clock.advance(HUNG_AFTER - 1)
    assert liveness.unanswered(clock.seconds(), sleeping()) is Verdict.SILENT
    clock.advance(1)
    assert liveness.unanswered(clock.seconds(), sleeping()) is Verdict.HUNG


def test_being_seen_busy_restarts_the_hung_clock() -> None:
    liveness = Liveness(0.0, hung_after=HUNG_AFTER)
    assert liveness.unanswered(20.0, ProcessSample("S", "RRSS", 5.0)) is Verdict.BUSY
    assert liveness.unanswered(20.0 + HUNG_AFTER - 1, sleeping(5.0)) is Verdict.SILENT
    assert liveness.unanswered(20.0 + HUNG_AFTER, sleeping(5.0)) is Verdict.HUNG


def test_a_sample_as_the_probe_starts_counts_for_the_probe_window() -> None:
    liveness = Liveness(0.0, hung_after=HUNG_AFTER)
    assert liveness.observed(100.0, sleeping(cpu=10.0)) is False
    # 4 CPU seconds over the 5 s the probe waited: it is working.
    assert liveness.unanswered(105.0, sleeping(cpu=14.0)) is Verdict.BUSY


def test_fresh_means_a_sign_of_life_within_the_window() -> None:
    liveness = Liveness(10.0, hung_after=HUNG_AFTER)
    assert liveness.fresh(10.0 + INTERVAL - 0.25, INTERVAL)
    assert not liveness.fresh(10.0 + INTERVAL, INTERVAL)


def test_only_answering_and_busy_hyperds_are_usable_and_only_hung_or_gone_replaced() -> None:
    assert {v for v in Verdict if v.usable} == {Verdict.ANSWERS, Verdict.BUSY}
    assert {v for v in Verdict if v.replace} == {Verdict.HUNG, Verdict.GONE}


def test_sample_states() -> None:
    assert stopped().stopped and not stopped().working and not stopped().gone
    assert ProcessSample("t", "t", 0).stopped  # stopped by a tracer
    assert ProcessSample("S", "SR", 0).working
    assert not sleeping().working
    assert GONE.gone and ProcessSample("Z", "Z", 0).gone


# -- read_process_sample, against real processes ------------------------------


def spawn(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)


@pytest.fixture
def processes():
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def sample_of(pid: int) -> ProcessSample:
    sample = read_process_sample(pid)
    assert sample is not None
    return sample


def test_a_sleeping_process_reads_as_sleeping(processes) -> None:
    processes.append(p := spawn("import time; time.sleep(120)"))
    sample = wait_for(lambda: (s := sample_of(p.pid)).state == "S" and s, 15, "it to sleep")
    assert not (sample.working or sample.stopped or sample.gone)
    assert sample.thread_states == "S"


def test_a_stopped_process_reads_as_stopped(processes) -> None:
    processes.append(p := spawn("import time; time.sleep(120)"))
    os.kill(p.pid, signal.SIGSTOP)
    sample = wait_for(lambda: (s := sample_of(p.pid)).stopped and s, 15, "it to be stopped")
    assert set(sample.thread_states) == {"T"} and not sample.working
    os.kill(p.pid, signal.SIGCONT)
    wait_for(lambda: not sample_of(p.pid).stopped, 15, "it to be continued")


def test_a_busy_process_reads_as_working_with_cpu_time_advancing(processes) -> None:
    processes.append(p := spawn("while True: pass"))
    first = sample_of(p.pid)
    wait_for(lambda: sample_of(p.pid).cpu_seconds >= first.cpu_seconds + 0.2, 15,
             "its CPU time to advance")
    wait_for(lambda: sample_of(p.pid).working, 15, "it to be seen on a CPU")


def test_every_thread_is_read(processes) -> None:
    code = ("import threading, time\n"
            "for _ in range(3): threading.Thread(target=time.sleep, args=(120,), daemon=True)"
            ".start()\n"
            "time.sleep(120)")
    processes.append(p := spawn(code))
    wait_for(lambda: sample_of(p.pid).thread_states == "SSSS", 15, "four sleeping threads")


def test_an_exited_process_reads_as_gone(processes) -> None:
    processes.append(p := spawn("pass"))
    # Not reaped yet: a zombie.
    wait_for(lambda: sample_of(p.pid).gone, 15, "it to exit")
    p.wait()
    assert read_process_sample(p.pid) is GONE


def test_without_proc_nothing_is_known(tmp_path: Path) -> None:
    assert read_process_sample(os.getpid(), proc=tmp_path / "no-proc") is None
