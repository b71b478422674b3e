"""Run a command and measure its wall time and the CPU it and its children spent."""

from __future__ import annotations

import os
import re
import resource
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    wall: float
    cpu: float
    returncode: int
    # Every process's CPU on the machine meanwhile (/proc/stat): the client's and what it made
    # the targets do, when they share the machine.
    machine_cpu: float = 0.0


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run(argv: list[str], **kwargs) -> Run:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = machine_busy_seconds()
    started = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    wall = time.perf_counter() - started
    machine_cpu = machine_busy_seconds() - busy
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(wall, cpu, done.returncode, machine_cpu)


def median_of(runs: list[Run]) -> Run:
    return Run(
        statistics.median(r.wall for r in runs),
        statistics.median(r.cpu for r in runs),
        max(r.returncode for r in runs),
        statistics.median(r.machine_cpu for r in runs),
    )


@dataclass
class Spawned:
    """One process measured on its own: its wall time, the CPU and peak RSS `os.wait4` gives
    for it (its own and those of the children it waited for, and no other child of the bench),
    its exit code, when it printed its first line matching a pattern, and its stdout."""

    wall: float
    cpu: float
    max_rss_kib: int
    returncode: int
    first_match: float | None
    stdout: list[str]
    stderr_tail: str


def spawn(
    argv: list[str],
    first: re.Pattern[str] | None = None,
    stdin: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Spawned:
    """Run `argv`, reading its stdout line by line as it comes (a monotonic clock times the first
    line matching `first`), and reap it with `os.wait4` on its pid. ru_maxrss from wait4 is the
    largest resident set of the process and of each child it waited for (each on its own: never a
    sum); getrusage(RUSAGE_CHILDREN) would instead give the largest of every child the bench has
    had so far."""
    with open(stdin or os.devnull, "rb") as source, tempfile.TemporaryFile() as errors:
        started = time.monotonic()
        process = subprocess.Popen(argv, stdin=source, stdout=subprocess.PIPE, stderr=errors, env=env, cwd=cwd)
        first_match = None
        lines = []
        assert process.stdout is not None
        with process.stdout:
            for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                if first_match is None and first is not None and first.search(line):
                    first_match = time.monotonic() - started
                lines.append(line)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        tail = errors.read()[-400:].decode(errors="replace").strip()
    return Spawned(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, process.returncode, first_match, lines, tail)
