"""Run a command and measure its wall time and the CPU it and its children spent."""

from __future__ import annotations

import resource
import statistics
import subprocess
import time
from dataclasses import dataclass


@dataclass
class Run:
    wall: float
    cpu: float
    returncode: int


def run(argv: list[str], **kwargs) -> Run:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(wall, cpu, done.returncode)


def median_of(runs: list[Run]) -> Run:
    return Run(
        statistics.median(r.wall for r in runs), statistics.median(r.cpu for r in runs), max(r.returncode for r in runs)
    )
