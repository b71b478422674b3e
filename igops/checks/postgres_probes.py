"""The Postgres checks of `igops check` (each cluster's primary and standbys, judged against
the live primary, and repmgrd on every member) and the PgBouncer checks (the admin console,
where each database routes, and how long a pause has lasted)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from igops.checks import Perf, Probe, Report, Result, level, worst
from igops.checks.probe_context import Context, MemberView, elapsed_ms, first_line_of, live_primary, postgres_connect
from igops.errors import NagiosStatus
from igops.output import plural

if TYPE_CHECKING:
    from igops.inventory_model import Check, Host, PostgresCluster


def postgres_probes(context: Context) -> list[Probe]:
    selected = {host.name for host in context.hosts}
    built = []
    for name, cluster in context.fleet.model.postgres.clusters.items():
        members = [cluster.primary, *cluster.standbys]
        if not selected & set(members):
            continue
        expected = [("postgres-primary", cluster.primary)] + [("postgres-standby", s) for s in cluster.standbys]
        built.append(Probe(f"postgres-{name}", expected, _postgres_runner(context, name, cluster)))
        built.append(
            Probe(
                f"repmgrd-{name}",
                [("postgres-repmgrd", member) for member in members],
                _repmgrd_runner(context, name, members),
            )
        )
    return built


def _repmgrd_runner(context: Context, cluster_name: str, members: list[str]) -> Callable[[Report], None]:
    """repmgrd on each member, as its registration in the node's shared memory says. Running on no
    member is a fleet without automatic failover (OK); on some members only, or paused outside
    an operation, leaves a failover to chance (WARNING)."""
    from igops import postgres

    def state_of(name: str) -> tuple[str, str | None]:
        try:
            connection = postgres_connect(
                context, context.fleet.host(name), context.probe_timeout, postgres.REPMGR_DATABASE
            )
            try:
                return name, postgres.repmgrd_state(connection)
            finally:
                connection.close()
        except Exception:  # noqa: BLE001 - a member that does not answer is the postgres check's finding
            return name, None

    def run(report: Report) -> None:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(members), thread_name_prefix="repmgrd") as pool:
            states = dict(pool.map(state_of, members))
        in_use = any(state in ("running", "paused") for state in states.values())
        for name, state in states.items():
            if state is None:
                status, summary = NagiosStatus.UNKNOWN, "repmgrd: the node does not answer"
            elif state == "paused":
                status, summary = (
                    NagiosStatus.WARNING,
                    "repmgrd paused: no automatic failover "
                    f"(`igops pg switchover {cluster_name} --to PRIMARY` unpauses it)",
                )
            elif state == "not running" and in_use:
                status, summary = (
                    NagiosStatus.WARNING,
                    f"repmgrd not running here but on other members of {cluster_name}: automatic failover may not act",
                )
            else:
                status, summary = NagiosStatus.OK, f"repmgrd {state}" + ("" if in_use else " (not in use)")
            report(Result("postgres-repmgrd", name, status, summary, duration_ms=elapsed_ms(started)))

    return run


def _postgres_runner(context: Context, cluster_name: str, cluster: PostgresCluster) -> Callable[[Report], None]:
    thresholds = context.fleet.model.check

    def run(report: Report) -> None:
        started = time.monotonic()
        views = context.postgres_views(cluster_name)
        primary = live_primary(cluster, views)
        primary_error: str | None
        if primary is None:
            answers = "; ".join(f"{name}: {view.error or 'a standby'}" for name, view in views.items())
            primary_error = f"no member accepts writes ({answers})"
        else:
            primary_error = views[primary].write_error
        named = primary or cluster.primary
        if primary_error:
            report(
                Result(
                    "postgres-primary",
                    named,
                    NagiosStatus.CRITICAL,
                    f"cluster {cluster_name}: not writable: {primary_error}",
                    duration_ms=elapsed_ms(started),
                )
            )
        else:
            replication = views[named].replication
            streaming = sum(1 for state, _ in replication.values() if state == "streaming")
            moved = f"; promoted (the inventory lists {cluster.primary} first)" if named != cluster.primary else ""
            report(
                Result(
                    "postgres-primary",
                    named,
                    NagiosStatus.OK,
                    f"cluster {cluster_name}: writable, {streaming} standby(s) streaming{moved}",
                    [Perf(f"postgres-primary {named}", elapsed_ms(started) / 1000, "s", minimum=0)],
                    duration_ms=elapsed_ms(started),
                )
            )
        for standby in views:
            if standby != named:
                row = views[named].replication.get(standby)
                report(
                    _standby_result(
                        named,
                        standby,
                        row,
                        primary_error,
                        views[standby],
                        views[named].wal_lsn,
                        thresholds,
                        elapsed_ms(started),
                    )
                )

    return run


def _standby_result(
    primary: str,
    standby: str,
    row: tuple[str, int | None] | None,
    primary_error: str | None,
    view: MemberView,
    primary_lsn: int | None,
    thresholds: Check,
    duration_ms: float,
) -> Result:
    if view.in_recovery is False:
        return Result(
            "postgres-standby",
            standby,
            NagiosStatus.CRITICAL,
            f"not in recovery: {standby} is a second primary",
            duration_ms=duration_ms,
        )
    if row and row[0] == "streaming":
        # From where the standby says it has replayed, not pg_stat_replication's replay_lsn: that
        # is its last report (every wal_receiver_status_interval, 10 s), and after a WAL segment
        # switch (archive_timeout on a quiet primary) it trails by the rest of the segment, up to
        # 16 MB of "lag" the standby replayed long ago. The two positions are read at about the
        # same moment; a standby read a moment later may be past the primary's: no lag.
        lag = (
            max(0, primary_lsn - view.wal_lsn) if primary_lsn is not None and view.wal_lsn is not None else row[1] or 0
        )
        state = level(lag, thresholds.replication_lag_warning_bytes, thresholds.replication_lag_critical_bytes)
        return Result(
            "postgres-standby",
            standby,
            state,
            f"streaming from {primary}, replay lag {lag} bytes",
            [
                Perf(
                    f"postgres-lag {standby}",
                    lag,
                    "B",
                    thresholds.replication_lag_warning_bytes,
                    thresholds.replication_lag_critical_bytes,
                    0,
                )
            ],
            duration_ms=duration_ms,
        )
    if primary_error and view.receiver == "streaming":
        return Result(
            "postgres-standby",
            standby,
            NagiosStatus.UNKNOWN,
            f"its WAL receiver is streaming, but the primary {primary} cannot confirm its lag",
            duration_ms=duration_ms,
        )
    why = f"{standby} itself: {view.error}" if view.error else f"its WAL receiver is {view.receiver or 'not running'}"
    seen = f" (primary reports state {row[0]})" if row else ""
    return Result(
        "postgres-standby",
        standby,
        NagiosStatus.CRITICAL,
        f"not streaming from {primary}{seen}; {why}",
        duration_ms=duration_ms,
    )


# --- PgBouncer ----------------------------------------------------------------------------------


def pgbouncer_probe(context: Context, host: Host) -> Probe:
    fleet = context.fleet
    model = fleet.model
    thresholds = model.check

    def run(report: Report) -> None:
        import psycopg2

        started = time.monotonic()
        try:
            connection = psycopg2.connect(
                host=str(host.address),
                port=model.pgbouncer.port,
                user=model.pgbouncer.admin_user,
                dbname="pgbouncer",
                password=context.secrets.get("pgbouncer_password"),
                connect_timeout=max(1, int(context.probe_timeout)),
            )
            try:
                connection.autocommit = True
                with connection.cursor() as cursor:
                    cursor.execute("SHOW POOLS")
                    assert cursor.description is not None, "SHOW POOLS returns rows"
                    columns = [column.name for column in cursor.description]
                    pools = [dict(zip(columns, row, strict=False)) for row in cursor.fetchall()]
                    cursor.execute("SHOW DATABASES")
                    assert cursor.description is not None, "SHOW DATABASES returns rows"
                    columns = [column.name for column in cursor.description]
                    databases = {
                        row["name"]: row for row in (dict(zip(columns, r, strict=False)) for r in cursor.fetchall())
                    }
            finally:
                connection.close()
        except Exception as exc:  # noqa: BLE001
            report(
                Result(
                    "pgbouncer", host.name, NagiosStatus.CRITICAL, first_line_of(exc), duration_ms=elapsed_ms(started)
                )
            )
            return
        problems = []
        for cluster_name, cluster in model.postgres.clusters.items():
            database = cluster.pgbouncer_database
            if not database:
                continue
            entry = databases.get(database)
            live = live_primary(cluster, context.postgres_views(cluster_name))
            primary = fleet.host(live) if live else None
            if entry is None:
                problems.append(f"no database {database!r} (cluster {cluster_name})")
            elif primary and entry.get("host") not in (str(primary.address), primary.name):
                problems.append(
                    f"{database} points at {entry.get('host')}, not the primary {primary.name} ({primary.address})"
                )
        user_pools = [pool for pool in pools if pool.get("database") != "pgbouncer"]
        waiting = sum(int(pool.get("cl_waiting") or 0) for pool in user_pools)
        longest = max(
            (float(pool.get("maxwait") or 0) + float(pool.get("maxwait_us") or 0) / 1e6 for pool in user_pools),
            default=0.0,
        )
        paused = sorted(
            name for name, entry in databases.items() if name != "pgbouncer" and int(entry.get("paused") or 0)
        )
        now = time.time()
        since = paused_since(fleet.state_dir / "check" / f"pgbouncer-paused-{host.name}.json", paused, now)
        paused_state, paused_text = paused_finding(since, now, thresholds.pgbouncer_paused_critical_seconds)
        state = (
            NagiosStatus.CRITICAL
            if problems
            else worst(
                [
                    paused_state,
                    level(
                        longest, thresholds.pgbouncer_wait_warning_seconds, thresholds.pgbouncer_wait_critical_seconds
                    ),
                ]
            )
        )
        counts = (
            f"{plural(len([name for name in databases if name != 'pgbouncer']), 'database')}, "
            f"{plural(waiting, 'client')} waiting, "
            f"longest wait {longest:.1f} s"
        )
        summary = "; ".join(filter(None, [*problems, paused_text, None if problems else counts]))
        report(
            Result(
                "pgbouncer",
                host.name,
                state,
                summary,
                [
                    Perf(f"pgbouncer-waiting {host.name}", waiting, minimum=0),
                    Perf(
                        f"pgbouncer-maxwait {host.name}",
                        round(longest, 3),
                        "s",
                        thresholds.pgbouncer_wait_warning_seconds,
                        thresholds.pgbouncer_wait_critical_seconds,
                        0,
                    ),
                ],
                duration_ms=elapsed_ms(started),
            )
        )

    return Probe(f"pgbouncer-{host.name}", [("pgbouncer", host.name)], run)


def paused_since(path: Path, paused: list[str], now: float) -> dict[str, float]:
    """database -> when a check first saw it paused (Unix time), for the databases paused now.
    PgBouncer does not say since when a database is paused, so each check remembers it in
    `path` (one file per PgBouncer host) and forgets a database once it is seen resumed."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    since = {name: float(known[name]) if isinstance(known.get(name), (int, float)) else now for name in paused}
    if since != known:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
        temporary.write_text(json.dumps(since))
        os.replace(temporary, path)
    return since


def paused_finding(since: dict[str, float], now: float, critical_seconds: float) -> tuple[NagiosStatus, str | None]:
    """WARNING while a database is paused; CRITICAL once checks have seen it paused for
    `critical_seconds` (a switchover holds it for seconds, so longer means an operation died
    or an operator forgot the RESUME)."""
    if not since:
        return NagiosStatus.OK, None
    ages = {name: max(0.0, now - first) for name, first in sorted(since.items())}
    state = NagiosStatus.CRITICAL if max(ages.values()) >= critical_seconds else NagiosStatus.WARNING
    shown = ", ".join(f"{name} (seen paused for {age:.0f} s)" for name, age in ages.items())
    return state, (
        f"PAUSED: {shown}; CRITICAL after {critical_seconds:g} s; "
        "RESUME it on the admin console when no operation holds it"
    )
