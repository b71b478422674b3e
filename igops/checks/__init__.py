"""`igops check`: one Result per (check, target), and a runner that starts every probe at once
and stops waiting at one global deadline.

A probe is a function that reports Results as it learns them. Each runs in a daemon thread, so
a probe stuck in a hung connect or a blocked query can never hold the run (or the process's
exit) past the deadline; every (check, target) it promised but did not report by then is
CRITICAL, since "did not answer in time" is an outage to the person paged for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from igops.errors import NagiosStatus

# The order in which one status outranks another when a run is summed up (Nagios convention:
# any CRITICAL makes the run CRITICAL, then WARNING, then UNKNOWN).
SEVERITY = {NagiosStatus.OK: 0, NagiosStatus.UNKNOWN: 1, NagiosStatus.WARNING: 2, NagiosStatus.CRITICAL: 3}


@dataclass(frozen=True)
class Perf:
    """One perfdata item: 'label'=value[unit];warn;crit;min;max."""

    label: str
    value: float
    unit: str = ""
    warning: float | None = None
    critical: float | None = None
    minimum: float | None = None
    maximum: float | None = None


@dataclass
class Result:
    check: str
    target: str
    status: NagiosStatus
    summary: str
    perfdata: list[Perf] = field(default_factory=list)
    duration_ms: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.check, self.target

    @property
    def group(self) -> str:
        return self.check.split("-", 1)[0]


Report = Callable[[Result], None]


@dataclass
class Probe:
    """Work that reports on the listed (check, target) pairs."""

    name: str
    expected: list[tuple[str, str]]
    run: Callable[[Report], None]


def worst(statuses: Iterable[NagiosStatus]) -> NagiosStatus:
    return max(statuses, key=SEVERITY.__getitem__, default=NagiosStatus.OK)


def level(value: float, warning: float | None, critical: float | None) -> NagiosStatus:
    """Where a value that is bad when high stands against its thresholds."""
    if critical is not None and value >= critical:
        return NagiosStatus.CRITICAL
    if warning is not None and value >= warning:
        return NagiosStatus.WARNING
    return NagiosStatus.OK


def run_all(probes: list[Probe], timeout: float) -> list[Result]:
    """Run every probe concurrently; return by the deadline, whatever is still running."""
    started = time.monotonic()
    deadline = started + timeout
    lock = threading.Lock()
    reported: dict[tuple[str, str], Result] = {}

    def starter(probe: Probe) -> threading.Thread:
        def report(result: Result) -> None:
            if result.duration_ms is None:
                result.duration_ms = round((time.monotonic() - started) * 1000, 1)
            with lock:
                reported[result.key] = result

        def body() -> None:
            try:
                probe.run(report)
            except Exception as exc:  # noqa: BLE001 - a probe's bug is a finding about that probe
                text = str(exc).strip().splitlines()
                reason = f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
                for check, target in probe.expected:
                    with lock:
                        if not any(
                            key == (check, target) or _in_another_role(key, (check, target)) for key in reported
                        ):
                            reported[(check, target)] = Result(
                                check, target, NagiosStatus.UNKNOWN, f"probe failed: {reason}"
                            )

        thread = threading.Thread(target=body, name=f"check-{probe.name}", daemon=True)
        thread.start()
        return thread

    threads = [starter(probe) for probe in probes]
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        results = dict(reported)
    ordered: list[Result] = []
    for probe in probes:
        for key in probe.expected:
            result = results.pop(key, None) or next(
                (results.pop(other) for other in list(results) if _in_another_role(other, key)), None
            )
            ordered.append(result or Result(key[0], key[1], NagiosStatus.CRITICAL, f"no answer within {timeout:g} s"))
    ordered.extend(results.values())
    return ordered


def _in_another_role(found: tuple[str, str], expected: tuple[str, str]) -> bool:
    """The answer for an expected (check, target) under the target's live role: the inventory
    names a cluster's members, and after a failover "postgres-primary db1" is answered as
    "postgres-standby db1"."""
    return found[1] == expected[1] and found[0].split("-")[0] == expected[0].split("-")[0] and found[0] != expected[0]


def overall(results: list[Result]) -> NagiosStatus:
    return worst(result.status for result in results)


def counts(results: list[Result]) -> dict[str, int]:
    found = {status.name.lower(): 0 for status in NagiosStatus}
    for result in results:
        found[result.status.name.lower()] += 1
    return found
