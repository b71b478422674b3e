"""The `operations` check: operations interrupted (WARNING: someone must resume or abort them)
and operations holding their lease far longer than their kind takes (CRITICAL: a hung run
blocks every other operation on its targets)."""

from __future__ import annotations

import time

from igops.checks import Probe, Result
from igops.errors import NagiosStatus

TARGET = "operations"


def verdict(records: list[dict], overdue_by: dict[str, float], stale: str | None) -> tuple[NagiosStatus, str]:
    """One line for the fleet's operations: `records` are the running and interrupted ones,
    `overdue_by` the seconds each overdue one is past its kind's expected duration."""
    interrupted = [r for r in records if r.get("status") == "interrupted"]
    parts, status = [], NagiosStatus.OK
    if overdue_by:
        status = NagiosStatus.CRITICAL
        parts += [f"{r['kind']} {r['id']} held {overdue_by[r['id']] / 60:.0f} min past its expected time "
                  f"by {r.get('user')}@{r.get('host')}" for r in records if r["id"] in overdue_by]
    if interrupted:
        status = NagiosStatus.WARNING if status == NagiosStatus.OK else status
        parts += [f"{r['kind']} {r['id']} interrupted at {_step(r)} (igops ops resume|abort {r['id']})"
                  for r in interrupted]
    if stale:
        status = NagiosStatus.UNKNOWN if status == NagiosStatus.OK else status
        parts.append(f"coordinator unavailable ({stale}); list as last read")
    running = len(records) - len(interrupted)
    return status, "; ".join(parts) or (f"{running} running, none interrupted" if running else "none running or interrupted")


def _step(record: dict) -> str:
    step = record.get("step") or {}
    return f"step {step.get('number')} ({step.get('title')})" if step else "its start"


def operations_probe(fleet) -> Probe:
    def run(report) -> None:
        from igops import operations_view

        started = time.monotonic()
        view = operations_view.list_operations(fleet)
        overdue = {r["id"]: late for r in view.records if (late := operations_view.overdue(r)) is not None}
        status, summary = verdict(view.records, overdue, view.stale)
        report(Result("operations", TARGET, status, summary, duration_ms=(time.monotonic() - started) * 1000))

    return Probe("operations", [("operations", TARGET)], run)
