"""
Whether a C{hyperd} that does not answer is busy, stopped, hung or gone: the
judgement the supervisor acts on, and the one read of C{/proc} it is made
from.

A probe that times out is not enough to replace C{hyperd}.  Six heavy
queries on two cores keep a C{SELECT 1} waiting for seconds, and a stopped
process (SIGSTOP) answers as soon as it is continued; killing either loses
every change it holds in memory (HYPERD.md, "Durability").  So after each
probe the supervisor asks L{Liveness}, which also weighs what the kernel
says about the process (L{ProcessSample}): its CPU time still advancing, or
a thread running or waiting on the disk, is a sign of life as good as an
answer.  Only a C{hyperd} that has shown no sign of life for
L{Liveness.hung_after} seconds is hung; one whose process is gone is
replaced at once.  L{Liveness} does no I/O and is told the time: tests
drive it with a fake clock and made-up samples.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

import attrs

@attrs.frozen
class ProcessSample:
    """What the kernel says about a process at one moment."""

    #: The state letter of the process (its main thread) in C{/proc/PID/stat}:
    #: C{R} running, C{S} sleeping, C{D} disk wait, C{T} stopped, C{Z} zombie...
    state: str
    #: The state letters of all its threads.
    thread_states: str
    #: User and system CPU seconds of all its threads so far.
    cpu_seconds: float

    @property
    def gone(self) -> bool:
        """It has exited (a zombie, or no such process)."""
        return self.state in ("Z", "X", "x", "")

    @property
    def stopped(self) -> bool:
        """Stopped by a signal (or a tracer): it cannot answer until continued."""
        return self.state in ("T", "t")

    @property
    def working(self) -> bool:
        """A thread is on a CPU (or waiting for one) or waiting on the disk."""
        return not self.stopped and any(s in "RD" for s in self.thread_states)


#: The sample of a process that does not exist.
GONE = ProcessSample("", "", 0.0)


def _stat_fields(text: str) -> list[str]:
    # The command name, in parentheses, may hold spaces and parentheses.
    return text.rsplit(")", 1)[1].split()


def read_process_sample(pid: int, proc: Path = Path("/proc")) -> ProcessSample | None:
    """
    Read C{pid}'s state and CPU time from C{proc} (C{/proc/PID/stat} and
    C{/proc/PID/task/*/stat}).

    @return: the sample; L{GONE} if there is no such process; C{None} where
        there is no C{/proc} to read (not Linux).
    """
    if not proc.is_dir():
        return None
    base = proc / str(pid)
    try:
        fields = _stat_fields((base / "stat").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return GONE
    threads = []
    try:
        tasks = list((base / "task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        tasks = []
    for task in tasks:
        try:
            threads.append(_stat_fields((task / "stat").read_text())[0])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass  # the thread ended while we looked
    # Fields 14 and 15 of stat(5), utime and stime, counted from the state (3).
    ticks = int(fields[11]) + int(fields[12])
    return ProcessSample(fields[0], "".join(sorted(threads)), ticks / os.sysconf("SC_CLK_TCK"))


class Verdict(enum.Enum):
    """What a check found; L{replace} says whether the supervisor replaces it."""

    #: It answered the probe.
    ANSWERS = "answers"
    #: It did not answer, but it is working (CPU time advancing, a thread
    #: running or in disk wait): it answers once it can.
    BUSY = "busy"
    #: It did not answer and is stopped (SIGSTOP), not yet for long.
    STOPPED = "stopped"
    #: It did not answer and is idle, not yet for long.
    SILENT = "silent"
    #: No sign of life for L{Liveness.hung_after} seconds: replace it
    #: (gracefully: it still holds its data).
    HUNG = "hung"
    #: Its process has exited: replace it at once.
    GONE = "gone"

    @property
    def usable(self) -> bool:
        """Whether clients may be given it now."""
        return self in (Verdict.ANSWERS, Verdict.BUSY)

    @property
    def replace(self) -> bool:
        return self in (Verdict.HUNG, Verdict.GONE)


@attrs.define
class Liveness:
    """
    The signs of life of one C{hyperd}, from its probes and from samples of
    its process, and the verdict after a probe.  C{last_sign_of_life} starts
    at the time it became ready (it had just answered).
    """

    last_sign_of_life: float
    #: Seconds without any sign of life after which it is hung.
    hung_after: float = 30.0
    #: Share of one CPU that its CPU time must have advanced by between two
    #: samples to count as working.  An idle hyperd uses about 2 %.
    busy_share: float = 0.1
    _previous: tuple[float, ProcessSample] | None = attrs.field(default=None, init=False)

    def answered(self, now: float) -> Verdict:
        """It answered a probe at C{now}."""
        self.last_sign_of_life = now
        return Verdict.ANSWERS

    def observed(self, now: float, sample: ProcessSample | None) -> bool:
        """
        Take in a sample of its process made at C{now} (as a probe starts).

        @return: whether the sample shows it working since the one before.
        """
        working = self._working(now, sample)
        if working:
            self.last_sign_of_life = now
        return working

    def unanswered(self, now: float, sample: ProcessSample | None) -> Verdict:
        """
        The verdict on a probe that failed or timed out at C{now}, or was
        not sent because the sample, made at C{now}, showed the process
        stopped or gone.  C{sample} is C{None} where the process cannot be
        observed: then only the time since it last answered counts.
        """
        if sample is not None and sample.gone:
            return Verdict.GONE
        if self.observed(now, sample):
            return Verdict.BUSY
        if now - self.last_sign_of_life >= self.hung_after:
            return Verdict.HUNG
        if sample is not None and sample.stopped:
            return Verdict.STOPPED
        return Verdict.SILENT

    def fresh(self, now: float, within: float) -> bool:
        """Whether it showed a sign of life less than C{within} seconds before C{now}."""
        return now - self.last_sign_of_life < within

    def silent_for(self, now: float) -> float:
        """Seconds since its last sign of life."""
        return now - self.last_sign_of_life

    def _working(self, now: float, sample: ProcessSample | None) -> bool:
        if sample is None:
            return False
        previous, self._previous = self._previous, (now, sample)
        if sample.stopped or sample.gone:
            return False
        if sample.working:
            return True
        if previous is None or now <= previous[0]:
            return False
        then, before = previous
        return (sample.cpu_seconds - before.cpu_seconds) / (now - then) >= self.busy_share
