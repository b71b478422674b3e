"""The snapshot check: one verdict per set of data (a Postgres cluster, the Redis set, a host with
data mounts in neither), judged against its [snapshot] policy.

A set is backed up when any of its members has a fresh complete group: groups are taken on a
standby or replica (freezing a primary stalls its writes), and any member's group restores the
set. With a schedule, fresh means taken since the last scheduled moment that is older than
`[check] snapshot_grace_minutes` (WARNING when one scheduled group is missing, CRITICAL from two);
without one, `[check] snapshot_warning_hours` and `snapshot_critical_hours` apply to the newest
group's age. Groups a killed or failed create left behind make the verdict at least WARNING.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from igops.checks import Perf, Probe, Report, Result, level, worst
from igops.errors import NagiosStatus

if TYPE_CHECKING:
    from igops.checks.probe_context import Context
    from igops.inventory_model import Check
    from igops.snapshot_groups import SnapshotGroup
    from igops.snapshot_policy import DataSet


@dataclass(frozen=True)
class Verdict:
    status: NagiosStatus
    summary: str
    age_hours: float | None
    warning_hours: float
    critical_hours: float


def verdict(
    data_set: DataSet, groups: list[SnapshotGroup], now: datetime, stale_grace: timedelta, thresholds: Check
) -> Verdict:
    """Judge one set of data from every group (pure: the groups are listed by the caller)."""
    from igops import snapshot_groups

    mine = [group for group in groups if data_set.holds(group)]
    complete = [group for group in mine if group.state == snapshot_groups.STATE_COMPLETE]
    left = sorted(group.group_id for group in mine if snapshot_groups.stale(group, now, stale_grace))
    leftovers = (
        (
            f"; {len(left)} stale {'group' if len(left) == 1 else 'groups'} left by a killed or failed "
            f"create ({', '.join(left)}): `igops snapshot prune` deletes them"
        )
        if left
        else ""
    )
    schedule = data_set.policy.schedule
    grace = timedelta(minutes=thresholds.snapshot_grace_minutes)
    if schedule is not None:
        interval_h = schedule.interval.total_seconds() / 3600
        warning_h = interval_h + grace.total_seconds() / 3600
        critical_h = 2 * interval_h + grace.total_seconds() / 3600
    else:
        warning_h, critical_h = thresholds.snapshot_warning_hours, thresholds.snapshot_critical_hours
    if not complete:
        return Verdict(
            NagiosStatus.CRITICAL,
            f"no complete snapshot group of {data_set.label}" + leftovers,
            None,
            warning_h,
            critical_h,
        )
    newest = max(complete, key=lambda group: group.created)
    hours = (now - newest.created).total_seconds() / 3600
    where = f"{newest.group_id} (on {newest.host}) is {age_words(hours)} old"
    if schedule is None:
        status = level(hours, warning_h, critical_h)
        summary = f"newest complete group {where}"
    else:
        expected = schedule.latest_slot(now - grace)
        # Judged as cron judges a slot taken (SnapshotGroup.taken_for): by the taking machine's clock.
        if newest.taken_for >= expected:
            status, summary = NagiosStatus.OK, f"newest complete group {where}, as `{schedule.text}` wants"
        else:
            missed = -((newest.taken_for - expected) // schedule.interval)  # slots in (newest, expected]
            status = NagiosStatus.WARNING if missed == 1 else NagiosStatus.CRITICAL
            summary = (
                f"`{schedule.text}` wanted a group at {expected:%Y-%m-%d %H:%M} UTC; newest complete "
                f"group {where} ({missed} scheduled {'group' if missed == 1 else 'groups'} missing: "
                "is `igops snapshot cron` running?)"
            )
    if left:
        status = worst([status, NagiosStatus.WARNING])
    return Verdict(status, summary + leftovers, hours, warning_h, critical_h)


def age_words(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def snapshot_probes(context: Context) -> list[Probe]:
    """One probe judging every set with a member among the hosts checked, from the run's one
    listing of the groups."""
    from igops import snapshot_policy

    fleet = context.fleet
    selected = {host.name for host in context.hosts}
    sets = [data_set for data_set in snapshot_policy.data_sets(fleet) if selected & set(data_set.members)]
    if not sets:
        return []

    def run(report: Report) -> None:
        started = time.monotonic()
        try:
            groups = context.snapshot_groups()
        except Exception as exc:  # noqa: BLE001 - any failure to list is UNKNOWN, not a crash
            text = str(exc).strip().splitlines()
            for data_set in sets:
                report(
                    Result(
                        "snapshot",
                        data_set.name,
                        NagiosStatus.UNKNOWN,
                        f"cannot list snapshots: {(text[0] if text else type(exc).__name__)[:200]}",
                        duration_ms=_ms(started),
                    )
                )
            return
        now = datetime.now(UTC)
        grace = timedelta(minutes=fleet.model.snapshot.stale_after_minutes)
        for data_set in sets:
            judged = verdict(data_set, groups, now, grace, fleet.model.check)
            perf = (
                []
                if judged.age_hours is None
                else [
                    Perf(
                        f"snapshot-age {data_set.name}",
                        round(judged.age_hours, 2),
                        "h",
                        round(judged.warning_hours, 2),
                        round(judged.critical_hours, 2),
                        0,
                    )
                ]
            )
            report(Result("snapshot", data_set.name, judged.status, judged.summary, perf, duration_ms=_ms(started)))

    return [Probe("snapshot", [("snapshot", data_set.name) for data_set in sets], run)]


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
