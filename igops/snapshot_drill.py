"""`igops snapshot drill`: prove, on a schedule, that a cluster can be brought back to a point in
time, and how long that takes.

A drill restores the cluster onto a scratch host to a random point of the range its retained
groups and its WAL archive cover (or to `--to`), like `snapshot restore --to`, then checks what
came back:
- `pg_amcheck` on every database of the copy (indexes and heap, the extension installed where
  missing: the copy is promoted and is nobody's);
- the rows of every shard's tables with a creation time (`created_at`) up to a margin before the
  target, copy against the source now: a copy with fewer is a restore that lost writes (the
  source may have fewer, from deletes since);
- the time from the first volume to the promoted copy: the measured RTO.
It takes the copy away whatever happened, and records its outcome in the operation's journal,
where `igops check` reads the age of the last drill that passed.
"""

from __future__ import annotations

import random
import shlex
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from igops import remote
from igops.errors import IgopsError, RefusedError
from igops.operations import conflicts
from igops.output import Reporter, plural
from igops.restore_target import TIME, RecoveryTarget, parse_target

if TYPE_CHECKING:
    from igops.ebs import Ebs
    from igops.inventory import Fleet
    from igops.restore import RestorePlan
    from igops.restore_scripts import PostgresStart

# A transaction that began before the cutoff may commit after the target: rows stamped up to
# this long before the target are compared, so that no such transaction is in the window.
COUNT_MARGIN = timedelta(seconds=60)
DRILL_PORT = 5497
KIND = "snapshot-drill"


@dataclass
class DrillPlan:
    cluster: str
    onto: str
    target: RecoveryTarget
    chosen_at_random: bool
    range_from: datetime
    range_until: datetime
    restore: RestorePlan

    def steps(self) -> list[str]:
        cutoff = self.cutoff()
        restore_steps = [step for step in self.restore.steps() if not step.startswith("if any step fails")]
        return [
            f"on {self.cluster}'s primary: commit an empty transaction and switch the WAL segment, then wait "
            "until the archive holds it (replay stops at the first commit after the target: a quiet cluster "
            "may have none archived)",
            *restore_steps,
            f"on {self.onto}: pg_amcheck on every database of the copy",
            f"count the rows of every shard's tables created up to {cutoff.isoformat(timespec='seconds')}, "
            f"in the copy and on {self.cluster}'s primary",
            f"on {self.onto}: take the copy away (stop it, unmount, detach and delete its volumes), whatever happened",
        ]

    def resources(self) -> list[conflicts.Resource]:
        return self.restore.resources()

    def cutoff(self) -> datetime:
        assert self.target.time is not None  # a drill's target is always a time
        return self.target.time - COUNT_MARGIN


@dataclass
class DrillResult:
    cluster: str
    onto: str
    group_id: str
    target: str
    passed: bool
    rto_s: float | None = None
    amcheck: str | None = None
    shards: dict[str, dict[str, int | None]] = field(default_factory=dict)  # schema -> copy, source
    problems: list[str] = field(default_factory=list)
    reached: dict[str, Any] | None = None


def drill_target(
    range_from: datetime, range_until: datetime, to_time: str | None, rng: random.Random
) -> tuple[RecoveryTarget, bool]:
    """The drill's target: `to_time`, or a random moment between when the oldest group that
    records a WAL position became consistent and the last archived WAL (and whether it was
    picked at random); refused when the two are the same moment: there is nothing to replay."""
    if to_time:
        return parse_target(to_time, None, False), False
    span = (range_until - range_from).total_seconds()
    if span <= 0:
        raise RefusedError(
            f"the archive reaches no further than the newest group is consistent ({range_until.isoformat()})",
            "wait for the WAL archive to move on (igops pg archive status), or pass --to",
        )
    return RecoveryTarget(TIME, time=range_from + timedelta(seconds=rng.uniform(0, span))), True


def plan_drill(
    fleet: Fleet, ebs: Ebs, source: str, onto: str, to_time: str | None = None, rng: random.Random | None = None
) -> DrillPlan:
    from igops import restore as restoring, snapshot_groups, snapshot_wal
    from igops.pg import archive_status

    cluster = source if source in fleet.model.postgres.clusters else snapshot_wal.cluster_of(fleet, source)
    if cluster is None:
        raise RefusedError(f"{source} is neither a Postgres cluster nor a member of one", "name a cluster")
    marked = [
        group
        for group in snapshot_groups.groups(ebs)
        if group.state == snapshot_groups.STATE_COMPLETE and group.wal and group.wal.cluster == cluster
    ]
    if not marked:
        raise RefusedError(
            f"no complete snapshot group of {cluster} records its WAL position: nothing to drill",
            f"take one with `igops snapshot create <a standby of {cluster}>` (with [archive] set)",
        )
    oldest = min(group.wal.ended_at for group in marked if group.wal)
    archiver = archive_status.archiver_stats(fleet, cluster)[1]
    if not archiver.last_archived_time:
        raise RefusedError(f"nothing of {cluster} is archived yet", "check `igops pg archive status`")
    until = datetime.fromisoformat(archiver.last_archived_time)
    target, random_pick = drill_target(oldest, until, to_time, rng or random.Random())
    restore = restoring.plan_point_in_time(fleet, ebs, cluster, target, onto, port=DRILL_PORT)
    return DrillPlan(cluster, onto, target, random_pick, oldest, until, restore)


def run_drill(fleet: Fleet, ebs: Ebs, plan: DrillPlan, reporter: Reporter = Reporter()) -> DrillResult:
    from igops import restore as restoring, snapshot_groups

    # Before anything: a group gone since the plan refuses the drill, it does not fail it.
    snapshot_groups.check_readable(ebs, plan.restore.group_id)
    result = DrillResult(plan.cluster, plan.onto, plan.restore.group_id, plan.target.describe(), passed=False)
    try:
        with reporter.step(f"a commit after the target in {plan.cluster}'s archive") as step:
            step.detail = _commit_after_target(fleet, plan.cluster)
    except IgopsError as exc:
        result.problems.append(exc.one_line())
        reporter.fact(drill={"passed": False, "rto_s": None, "cluster": plan.cluster})
        return result
    started = time.monotonic()
    try:
        restored = restoring.restore(fleet, ebs, plan.restore, reporter)
        result.rto_s = round(time.monotonic() - started, 1)
        result.reached = restored.reached
        pg = plan.restore.postgres
        assert pg is not None  # a point-in-time plan always starts Postgres
        with reporter.step(f"pg_amcheck on {plan.onto}") as step:
            result.amcheck = step.detail = _amcheck(fleet, plan.onto, pg, result.problems)
        with reporter.step("rows per shard, copy and source") as step:
            result.shards = _counts(fleet, plan, pg, result.problems)
            step.detail = f"{plural(len(result.shards), 'shard')} compared"
    except IgopsError as exc:
        result.problems.append(exc.one_line())
    finally:
        with reporter.step(f"take the copy away from {plan.onto}") as step:
            try:
                undo = restoring.plan_cleanup(fleet, ebs, plan.restore.group_id, plan.onto)
                step.detail = f"{plural(len(restoring.cleanup(fleet, ebs, undo, reporter)), 'volume')} deleted"
            except IgopsError as exc:
                result.problems.append(f"the cleanup: {exc.one_line()}")
                step.status, step.detail = "failed", exc.one_line()[:200]
    result.passed = not result.problems
    reporter.fact(drill={"passed": result.passed, "rto_s": result.rto_s, "cluster": plan.cluster})
    return result


def _commit_after_target(fleet: Fleet, cluster: str) -> str:
    """Commit an empty transaction on the primary (an xid, so a commit record with its time),
    switch the segment and wait until the archive holds it: whatever target the plan chose is
    before it, so replay finds a commit past the target and stops there, where a quiet cluster's
    archive might hold none and recovery would end short of the target (FATAL)."""
    from igops import postgres_admin
    from igops.pg.archive_status import archiver_stats

    with postgres_admin.primary_connection(fleet, cluster, "postgres", autocommit=True, purpose="drill") as primary:
        with primary.cursor() as cursor:
            cursor.execute("SELECT txid_current()")
            cursor.execute("SELECT pg_walfile_name(pg_current_wal_lsn()), pg_switch_wal()")
            row = cursor.fetchone()
            assert row is not None  # a function call returns one row
    segment = str(row[0])
    archive_timeout = fleet.model.archive.archive_timeout if fleet.model.archive else 60
    deadline = time.monotonic() + 2 * archive_timeout + 30
    while True:
        last = archiver_stats(fleet, cluster)[1].last_archived_wal
        if last is not None and last[8:] >= segment[8:]:
            return f"{segment} archived"
        if time.monotonic() > deadline:
            raise IgopsError(
                f"{cluster}'s segment {segment} was not archived within {2 * archive_timeout + 30} s",
                "the archive is behind or failing: see `igops pg archive status`, then drill again",
            )
        time.sleep(1)


def _on_host(fleet: Fleet, host_name: str, command: str, timeout: float) -> remote.HostResult:
    [target] = remote.targets_for(fleet, [fleet.host(host_name)])
    [done] = remote.run([target], command, remote.settings_for(fleet), timeout=timeout)
    return done


def _amcheck(fleet: Fleet, onto: str, pg: PostgresStart, problems: list[str]) -> str:
    amcheck = (
        f"runuser -u {shlex.quote(pg.os_user)} -- {shlex.quote(pg.bin_dir)}/pg_amcheck "
        f"-h {shlex.quote(pg.run_directory)} -p {pg.port} --all --install-missing --heapallindexed"
    )
    done = _on_host(fleet, onto, amcheck, timeout=3600)
    if done.ok:
        return "no corruption found"
    said = (done.stdout + done.stderr).strip().splitlines()
    problems.append(f"pg_amcheck on the copy: {said[-1][:300] if said else 'exit ' + str(done.exit_code)}")
    return "corruption found"


def count_sql(schema_prefix: str, cutoff: datetime) -> str:
    """Per shard schema: the rows of its tables with a created_at, created up to `cutoff`."""
    like = schema_prefix.replace("_", r"\_") + "%"
    return (
        "SELECT n.nspname, sum((xpath('/row/c/text()', query_to_xml(format("
        "'SELECT count(*) AS c FROM %I.%I WHERE created_at <= %L', n.nspname, c.relname, "
        f"{_literal(cutoff.isoformat())}::timestamptz), false, true, '')))[1]::text::bigint) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'created_at' AND NOT a.attisdropped "
        f"WHERE c.relkind IN ('r', 'p') AND n.nspname LIKE {_literal(like)} GROUP BY 1 ORDER BY 1"
    )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def parse_counts(text: str) -> dict[str, int]:
    counts = {}
    for line in text.strip().splitlines():
        schema, _, count = line.partition("|")
        if schema:
            counts[schema] = int(count or 0)
    return counts


def compare_counts(copy: dict[str, int], source: dict[str, int]) -> tuple[dict[str, dict[str, int | None]], list[str]]:
    """A copy with fewer rows than the source for a shard lost writes; more is deletes since."""
    shards: dict[str, dict[str, int | None]] = {}
    problems = []
    for schema in sorted(set(copy) | set(source)):
        shards[schema] = {"copy": copy.get(schema), "source": source.get(schema)}
        if copy.get(schema, 0) < source.get(schema, 0):
            problems.append(f"{schema}: the copy has {copy.get(schema, 0)} rows, the source {source[schema]}")
    return shards, problems


def _counts(fleet: Fleet, plan: DrillPlan, pg: PostgresStart, problems: list[str]) -> dict[str, dict[str, int | None]]:
    from igops import postgres_admin

    sql = count_sql(fleet.model.shards.schema_prefix, plan.cutoff())
    database = fleet.model.postgres.database
    psql = pg.psql.replace(" -d postgres", f" -d {shlex.quote(database)}")
    done = _on_host(fleet, plan.onto, f"{psql} -XAtq -v ON_ERROR_STOP=1 -c {shlex.quote(sql)}", timeout=600)
    if not done.ok:
        problems.append(f"counting the copy's rows: {(done.stderr.strip() or 'exit ' + str(done.exit_code))[:300]}")
        return {}
    with postgres_admin.primary_connection(fleet, plan.cluster, database, autocommit=True, purpose="drill") as source:
        with source.cursor() as cursor:
            cursor.execute(sql)
            counted = {str(schema): int(count or 0) for schema, count in cursor.fetchall()}
    shards, lost = compare_counts(parse_counts(done.stdout), counted)
    problems += lost
    return shards
