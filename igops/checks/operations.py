"""The `operations` check: operations interrupted (WARNING: someone must resume or abort them)
and operations holding their lease far longer than their kind takes (CRITICAL: a hung run
blocks every other operation on its targets); and, on fleets with load balancers, app hosts an
igops deploy drained and no running deploy accounts for (WARNING: capacity an interrupted deploy
left out of rotation)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from igops.checks import Probe, Report, Result
from igops.errors import NagiosStatus

if TYPE_CHECKING:
    from igops.inventory import Fleet

TARGET = "operations"
ROTATION_TARGET = "app rotation"
DEPLOY_KINDS = ("deploy", "deploy-rollback")


def verdict(records: list[dict[str, Any]], overdue_by: dict[str, float], stale: str | None) -> tuple[NagiosStatus, str]:
    """One line for the fleet's operations: `records` are the running and interrupted ones,
    `overdue_by` the seconds each overdue one is past its kind's expected duration; `stale`, why
    the coordinator itself was not read and what the list is instead."""
    interrupted = [r for r in records if r.get("status") == "interrupted"]
    parts, status = [], NagiosStatus.OK
    if overdue_by:
        status = NagiosStatus.CRITICAL
        parts += [
            f"{r['kind']} {r['id']} held {overdue_by[r['id']] / 60:.0f} min past its expected time "
            f"by {r.get('user')}@{r.get('host')}"
            for r in records
            if r["id"] in overdue_by
        ]
    if interrupted:
        status = NagiosStatus.WARNING if status == NagiosStatus.OK else status
        parts += [_interrupted(r) for r in interrupted]
    if stale:
        status = NagiosStatus.UNKNOWN if status == NagiosStatus.OK else status
        parts.append(f"coordinator unavailable: {stale}")
    running = len(records) - len(interrupted)
    return status, "; ".join(parts) or (
        f"{running} running, none interrupted" if running else "none running or interrupted"
    )


def _interrupted(record: dict[str, Any]) -> str:
    failed = record.get("abort_failed")
    if failed:
        # The step is the abort's own: its run journals its steps as the operation's current one.
        why = (failed.get("detail") or failed.get("result") or "")[:200]
        return (
            f"{record['kind']} {record['id']} interrupted, its abort failed at {_step(record)}: {why} "
            f"(fix that, then igops ops abort {record['id']})"
        )
    return f"{record['kind']} {record['id']} interrupted at {_step(record)} (igops ops resume|abort {record['id']})"


def _step(record: dict[str, Any]) -> str:
    step = record.get("step") or {}
    return f"step {step.get('number')} ({step.get('title')})" if step else "its start"


def rotation_verdict(drained: list[str], records: list[dict[str, Any]]) -> tuple[NagiosStatus, str]:
    """App hosts igops drained (`drained`), against the deploys among `records` (running and
    interrupted operations): a running deploy drains on purpose; otherwise they are capacity
    left out by a run that did not finish."""
    if not drained:
        return NagiosStatus.OK, "every app host in rotation"
    hosts = ", ".join(drained)
    deploys = [r for r in records if r.get("kind") in DEPLOY_KINDS]
    running = [r for r in deploys if r.get("status") == "running"]
    if running:
        return NagiosStatus.OK, f"{hosts} drained by {running[-1]['kind']} {running[-1]['id']}, which is running"
    interrupted = [r for r in deploys if r.get("status") == "interrupted"]
    fix = (
        f"igops ops abort {interrupted[-1]['id']} puts back each that passes its health gate"
        if interrupted
        else "igops deploy again finishes the rollout and puts them back"
    )
    return NagiosStatus.WARNING, f"{hosts} out of rotation, drained by an igops deploy that is not running ({fix})"


def _drained(fleet: Fleet) -> list[str]:
    from igops import deploy

    with deploy.AppFleet.of(fleet) as app:
        return deploy.drained_by_igops(app)


def operations_probe(fleet: Fleet) -> Probe:
    with_lbs = bool(fleet.with_role("lb"))

    def run(report: Report) -> None:
        from igops import operations_view

        started = time.monotonic()
        view = operations_view.list_operations(fleet)
        overdue = {r["id"]: late for r in view.records if (late := operations_view.overdue(r)) is not None}
        status, summary = verdict(view.records, overdue, view.stale and f"{view.stale}; {view.stale_source()}")
        report(Result("operations", TARGET, status, summary, duration_ms=(time.monotonic() - started) * 1000))
        if with_lbs:
            started = time.monotonic()
            status, summary = rotation_verdict(_drained(fleet), view.records)
            report(
                Result("operations", ROTATION_TARGET, status, summary, duration_ms=(time.monotonic() - started) * 1000)
            )

    return Probe("operations", [("operations", TARGET)] + ([("operations", ROTATION_TARGET)] if with_lbs else []), run)
