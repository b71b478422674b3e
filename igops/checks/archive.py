"""The WAL archive check: one verdict per Postgres cluster when the fleet archives WAL
(`[archive]`), like `barman check --nagios`.

- CRITICAL: archive_mode is not on, or WAL has waited to be archived for more than
  10 × archive_timeout;
- WARNING: WAL has waited for more than 2 × archive_timeout, or archiving fails (the last
  failure is newer than the last success). A failure followed by a success is named in the
  summary, not alarmed on.
A repository that goes away is WARNING at once (archiving fails) and CRITICAL once the WAL it
holds up is 10 × archive_timeout old.
The wait is the oldest waiting segment's (its `.ready` file's age on the primary), not the last
archive's age: an idle cluster switches no segment, and the first one after an hour of quiet has
waited a moment, not an hour.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from igops.checks import Perf, Probe, Report, Result
from igops.errors import NagiosStatus

if TYPE_CHECKING:
    from igops.checks.probe_context import Context
    from igops.inventory import Fleet
    from igops.pg.archive_status import ArchiverStats, Backlog

WARNING_TIMEOUTS = 2
CRITICAL_TIMEOUTS = 10


def verdict(archiver: ArchiverStats, backlog: Backlog, archive_timeout: int) -> tuple[NagiosStatus, str]:
    """Judge one cluster's archiving (pure: the caller reads the primary). The repository itself
    is not read: a check must answer while it does not, and a repository that cannot take WAL
    shows as archiving that fails."""
    warning_s, critical_s = WARNING_TIMEOUTS * archive_timeout, CRITICAL_TIMEOUTS * archive_timeout
    age = archiver.last_archived_age_s
    last = (
        f"last archived {archiver.last_archived_wal} {age:.0f} s ago"
        if archiver.last_archived_wal and age is not None
        else "nothing archived yet"
    )
    ready_files = backlog.ready_files
    waiting = f"; {ready_files} segments wait" if ready_files else ""
    if ready_files and backlog.oldest_ready_age_s is not None:
        waiting += f", the oldest for {backlog.oldest_ready_age_s:.0f} s"
    if archiver.archive_mode != "on":
        return NagiosStatus.CRITICAL, f"archive_mode is {archiver.archive_mode}: run `igops pg archive setup`"
    failed_age = archiver.last_failed_age_s
    failing = archiver.last_failed_time is not None and (age is None or (failed_age is not None and failed_age < age))
    waited = backlog.waited_s(archiver)
    status = (
        NagiosStatus.CRITICAL
        if waited > critical_s
        else NagiosStatus.WARNING
        if waited > warning_s or failing
        else NagiosStatus.OK
    )
    if failing:
        summary = f"archiving fails: {archiver.last_failed_wal} failed {failed_age or 0:.0f} s ago; {last}{waiting}"
    elif failed_age is not None and failed_age < warning_s:
        # Worked again since: said, not alarmed on (a repository restart is such a blip).
        summary = f"{last}{waiting}; {archiver.last_failed_wal} failed {failed_age:.0f} s ago, then worked"
    else:
        summary = last + waiting
    if status != NagiosStatus.OK and ready_files:
        summary += f" (waiting: warning past {warning_s} s, critical past {critical_s} s)"
    return status, summary


def archive_perf(cluster: str, archiver: ArchiverStats, backlog: Backlog, archive_timeout: int) -> list[Perf]:
    """The check's perfdata. The thresholds go with what the verdict judges, the oldest waiting
    segment's wait (`ready-age`); the last archive's age is information: an idle cluster archives
    nothing, and is fine."""
    perf = []
    if archiver.last_archived_age_s is not None:
        perf.append(Perf(f"archive-age {cluster}", round(archiver.last_archived_age_s, 1), "s", minimum=0))
    waited = backlog.waited_s(archiver)
    # Infinite when segments wait but neither their time nor a last archive is known: no number
    # to graph (Nagios and JSON take none), and the verdict already says CRITICAL.
    if math.isfinite(waited):
        perf.append(
            Perf(
                f"ready-age {cluster}",
                round(waited, 1),
                "s",
                WARNING_TIMEOUTS * archive_timeout,
                CRITICAL_TIMEOUTS * archive_timeout,
                0,
            )
        )
    perf.append(Perf(f"ready {cluster}", float(backlog.ready_files or 0), minimum=0))
    return perf


def drill_verdict(
    records: list[dict[str, Any]],
    cluster: str,
    now: datetime,
    warning_days: float,
    critical_days: float,
    restorable_since: datetime | None = None,
) -> tuple[NagiosStatus, str, float | None]:
    """The age of the cluster's last `igops snapshot drill` that passed, from the operations'
    records (pure): WARNING past `warning_days`, CRITICAL past `critical_days`. A cluster never
    drilled is aged from `restorable_since`, when its oldest group that records a WAL position
    became consistent: drills fall due once there is something to drill, and a new fleet (or
    the lab) is not alarmed about a drill it could not have run."""
    passed = [record for record in records if _passed_drill_of(record, cluster)]
    hint = f"`igops snapshot drill {cluster} --onto HOST`"
    if passed:
        last = max(passed, key=lambda record: record["ended"])
        days = (now - datetime.fromisoformat(last["ended"])).total_seconds() / 86400
        summary = (
            f"last drill that passed: {last['id']}, {days:.1f} days ago, RTO {last['facts']['drill'].get('rto_s')} s"
        )
    elif restorable_since is None:
        return NagiosStatus.OK, f"nothing to drill yet: no group of {cluster} records a WAL position", None
    else:
        days = (now - restorable_since).total_seconds() / 86400
        summary = f"never drilled, restorable to a point in time for {days:.1f} days: {hint}"
    status = (
        NagiosStatus.CRITICAL
        if days > critical_days
        else NagiosStatus.WARNING
        if days > warning_days
        else NagiosStatus.OK
    )
    return status, summary, days


def _passed_drill_of(record: dict[str, Any], cluster: str) -> bool:
    """Whether an operation's record is an ended `snapshot drill` of `cluster` that passed."""
    drill = (record.get("facts") or {}).get("drill") or {}
    return (
        record.get("kind") == "snapshot-drill"
        and drill.get("cluster") == cluster
        and bool(drill.get("passed"))
        and bool(record.get("ended"))
    )


def restorable_since(groups: list[Any], cluster: str) -> datetime | None:
    """When the cluster's oldest complete group that records a WAL position became consistent."""
    from igops.snapshot_groups import STATE_COMPLETE

    ends = [
        group.wal.ended_at
        for group in groups
        if group.state == STATE_COMPLETE and group.wal is not None and group.wal.cluster == cluster
    ]
    return min(ends) if ends else None


def archive_probes(fleet: Fleet) -> list[Probe]:
    """One probe per cluster when the fleet archives WAL."""
    if fleet.model.archive is None:
        return []
    return [_probe(fleet, cluster) for cluster in fleet.model.postgres.clusters]


def drill_probes(context: Context) -> list[Probe]:
    """One probe for every cluster's drills when the fleet archives WAL (nothing to drill without)."""
    return [] if context.fleet.model.archive is None else [_drill_probe(context)]


def _drill_probe(context: Context) -> Probe:
    fleet = context.fleet
    clusters = list(fleet.model.postgres.clusters)

    def run(report: Report) -> None:
        from igops import operations_view

        thresholds = fleet.model.check
        try:
            records = operations_view.list_operations(fleet, include_ended=True).records
            groups = context.snapshot_groups()
        except Exception as exc:  # noqa: BLE001 - any failure to read is UNKNOWN, not a crash
            for cluster in clusters:
                report(
                    Result("drill", cluster, NagiosStatus.UNKNOWN, f"cannot read the operations or groups: {exc}"[:200])
                )
            return
        now = datetime.now(UTC)
        for cluster in clusters:
            status, summary, days = drill_verdict(
                records,
                cluster,
                now,
                thresholds.drill_warning_days,
                thresholds.drill_critical_days,
                restorable_since(groups, cluster),
            )
            perf = (
                []
                if days is None
                else [
                    Perf(
                        "drill-age",
                        round(days, 2),
                        "d",
                        thresholds.drill_warning_days,
                        thresholds.drill_critical_days,
                        0,
                    )
                ]
            )
            report(Result("drill", cluster, status, summary, perf))

    return Probe("snapshot drills", [("drill", cluster) for cluster in clusters], run)


def _probe(fleet: Fleet, cluster: str) -> Probe:
    def run(report: Report) -> None:
        from igops.pg.archive_status import archiver_stats, backlog

        assert fleet.model.archive is not None  # archive_probes makes none without it
        timeout = fleet.model.archive.archive_timeout
        started = time.monotonic()
        try:
            host, archiver = archiver_stats(fleet, cluster)
            waiting = backlog(fleet, host)[0]
        except Exception as exc:  # noqa: BLE001 - any failure to read is UNKNOWN, not a crash
            text = str(exc).strip().splitlines()
            said = (text[0] if text else type(exc).__name__)[:200]
            report(Result("archive", cluster, NagiosStatus.UNKNOWN, f"cannot read the archive: {said}"))
            return
        status, summary = verdict(archiver, waiting, timeout)
        perf = archive_perf(cluster, archiver, waiting, timeout)
        report(
            Result("archive", cluster, status, summary, perf, duration_ms=round((time.monotonic() - started) * 1000, 1))
        )

    return Probe(f"archive {cluster}", [("archive", cluster)], run)
