"""Logical shards: schemas on the physical Postgres clusters, placed by the directory.

- IDs: the service's 64-bit ids carry their creation time, logical shard and a sequence.
- `init_shards` creates a fleet's directory and shard schemas from the service's own DDL. It is
  idempotent and never moves anything: an existing shard map is kept as it is, and only the
  schemas it names are created where it says.
- `read_map`: which cluster holds each logical shard, and how many bytes.
- `verify_copies`: two copies of a shard compared table by table (ordered checksums, or a
  cheaper order-free row hash while a move waits on it).
- Moves: a shard is copied by logical replication, caught up, verified, cut over behind a
  brief write lock and switched in the map; every step is journaled in the directory
  (`shard_moves`) and idempotent, so a move killed at any point can be resumed or aborted.
- `plan_rebalance`: the moves that even out shards or bytes across clusters.

The ids are in shard_ids, the initialisation in shard_init, the map and the directory's
connections in shard_map, schema shapes and the shard DDL in shard_schema, the verification in
shard_verify, the move's steps and plans in shard_move_steps, its journal in shard_journal, and
the holding of a shard's writes in shard_locks.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from igops.errors import AlreadyRunning, IgopsError, RefusedError, UsageError
from igops.output import Reporter, human_bytes, plural
from igops.postgres import first_line
from igops.postgres_admin import (
    QUIET_STATEMENT_LOGGING,
    connect,
    primary_connection,
    primary_of,
    quote_ident,
    replication_connection,
    replication_conninfo,
)
from igops.shard_changes import ChangedRows
from igops.shard_ids import (
    DecodedId as DecodedId,
    decode_id as decode_id,
    encode_id as encode_id,
    parse_time as parse_time,
    shard_ranges as shard_ranges,
)
from igops.shard_init import (
    InitPlan as InitPlan,
    ShardInitReport as ShardInitReport,
    init_shards as init_shards,
    plan_init as plan_init,
)
from igops.shard_journal import (
    ABORTED,
    ACTIVE,
    DONE,
    Journal,
    MoveRecord as MoveRecord,
    operator_label,
)
from igops.shard_locks import (
    LOCK_SETTINGS,
    CutoverDeferred,
    flushed_position,
    lock_tables,
    wait_applied,
)
from igops.shard_map import (
    ClusterLoad as ClusterLoad,
    ShardMap as ShardMap,
    ShardPlacement as ShardPlacement,
    check_shard as check_shard,
    directory_connection,
    directory_session,
    placement_of,
    read_map as read_map,
    schema_name,
)
from igops.shard_move_steps import (
    COPY_PARALLEL,
    PAUSE_POINTS as PAUSE_POINTS,
    SEQUENCE_MARGIN,
    STEPS as STEPS,
    AbortPlan as AbortPlan,
    MovePlan as MovePlan,
    TableSize as TableSize,
    describe_step,
    resume_point as resume_point,
)
from igops.shard_schema import (
    act_as_owner,
    describe_schema,
    read_ddl,
    schema_diff,
    sequence_values,
    shard_ddl,
    tables_of,
)
from igops.shard_verify import (
    ShapeReport as ShapeReport,
    ShardCopy,
    TableCheck as TableCheck,
    VerifyReport as VerifyReport,
    verify_against as verify_against,
    verify_copies,
    verify_in_place as verify_in_place,
)

# --- replication plumbing ---------------------------------------------------------------------


def _applied_lsn(cursor, subscription: str):
    """What the subscription's apply worker has applied and reported, or None when no
    worker runs."""
    cursor.execute("SELECT pid, latest_end_lsn FROM pg_stat_subscription WHERE subname = %s AND relid IS NULL",
                   (subscription,))
    row = cursor.fetchone()
    return row[1] if row and row[0] else None


# --- moves ------------------------------------------------------------------------------------
PIPE_BLOCK = 256 * 1024  # bytes of COPY data handed on at a time
CUTOVER_ATTEMPTS = 3
CUTOVER_CATCH_UP_S = 1.0  # the longest the cut-over waits, writes held, for the last changes
MAX_CLOCK_SKEW_MS = 500
# How long the cleanup waits for the target to report having flushed the shard's last changes
# (the subscriber reports within a WAL writer cycle or two).
FLUSH_WAIT_S = 60


@dataclass
class MoveResult:
    move_id: int
    shard: int
    source: str
    target: str
    status: str
    map_version: int | None
    rows_copied: int | None
    bytes_copied: int | None
    verify_pause_ms: float | None
    lock_wait_ms: float | None
    write_block_ms: float | None
    duration_ms: float
    verify: VerifyReport | None = None


def plan_move(fleet, shard: int, target: str) -> MovePlan:
    """Check everything a new move needs before anything is changed: the shard and clusters
    exist, the shard is elsewhere, no move of it is unfinished, logical replication can run,
    the target has no conflicting copy, and the shard DDL builds on the target exactly the
    tables the source has (tried in a transaction that is rolled back)."""
    model = fleet.model
    check_shard(fleet, shard)
    target_primary = primary_of(fleet, target)
    source = placement_of(fleet, shard)
    if source == target:
        raise UsageError(f"shard {shard} is already on {target}", "pick another cluster with --to")
    if source not in model.postgres.clusters:
        raise IgopsError(f"the map places shard {shard} on {source}, which the inventory lacks",
                         "add the cluster to [postgres.clusters]")
    with directory_session(fleet) as directory:
        unfinished = Journal(directory).active_for(shard)
    if unfinished and unfinished.running:
        raise AlreadyRunning(f"move {unfinished.id} of shard {shard} ({unfinished.source} -> {unfinished.target}) "
                             f"is already running, at {unfinished.step}", "wait for it: `igops shard moves`")
    if unfinished:
        raise RefusedError(f"shard {shard} has an unfinished move {unfinished.id} ({unfinished.source} -> "
                           f"{unfinished.target}, {unfinished.state} at {unfinished.step})",
                           f"igops shard move --resume {unfinished.id}, or --abort {unfinished.id}")
    schema = schema_name(fleet, shard)
    database = model.postgres.database
    template = read_ddl(fleet, "shard_ddl")
    with primary_connection(fleet, source, database, autocommit=True, purpose="shards") as connection:
        with connection.cursor() as cursor:
            source_shape = describe_schema(cursor, schema)
            if source_shape is None:
                raise IgopsError(f"the map places shard {shard} on {source}, but {source} has no schema {schema}",
                                 "check `igops shard moves` and `igops shard verify`")
            keyless = [name for name, table in sorted(source_shape.tables.items()) if not table.primary_key]
            if keyless:
                raise RefusedError(f"{schema} has tables without a primary key: {', '.join(keyless)}",
                                   "logical replication needs one per table; add it first")
            _check_replication_capacity(cursor, source)
            tables = _table_sizes(cursor, schema)
    with primary_connection(fleet, target, database, purpose="shards") as connection:
        with connection.cursor() as cursor:
            existing = describe_schema(cursor, schema)
            if existing is not None and any(_has_rows(cursor, schema, name) for name in existing.tables):
                raise RefusedError(f"{target} already has a schema {schema} with rows in it",
                                   f"a leftover copy? inspect it, drop it on {target_primary.name}, then retry")
            act_as_owner(cursor)
            cursor.execute(shard_ddl(template, schema, shard))
            built = describe_schema(cursor, schema)
        connection.rollback()
    diff = schema_diff(source_shape, built, source, target)
    if diff:
        raise RefusedError(f"the shard DDL does not build on {target} the tables {schema} has on {source}: "
                           + "; ".join(diff[:5]) + (f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""),
                           "make [shards] shard_ddl match the shard's tables (or drop what is extra), then retry")
    return MovePlan(shard, schema, source, target, primary_of(fleet, source).name, target_primary.name, database,
                    tables, model.postgres.max_lag_bytes)


def _has_rows(cursor, schema: str, table: str) -> bool:
    from psycopg2 import sql

    cursor.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(schema, table)))
    return cursor.fetchone()[0]


def _table_sizes(cursor, schema: str) -> list[TableSize]:
    """Rows from the planner's estimate, counted instead for tables never analysed."""
    from psycopg2 import sql

    cursor.execute("""
        SELECT c.relname, c.reltuples::bigint, pg_table_size(c.oid)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1""", (schema,))
    sizes = []
    for name, rows, size in cursor.fetchall():
        if rows < 0:
            cursor.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name)))
            rows = cursor.fetchone()[0]
        sizes.append(TableSize(name, rows, size))
    return sizes


def _check_replication_capacity(cursor, cluster: str) -> None:
    cursor.execute("SELECT current_setting('wal_level'), current_setting('max_replication_slots')::int, "
                   "(SELECT count(*) FROM pg_replication_slots), current_setting('max_wal_senders')::int, "
                   "(SELECT count(*) FROM pg_stat_replication)")
    wal_level, max_slots, slots, max_senders, senders = cursor.fetchone()
    if wal_level != "logical":
        raise RefusedError(f"{cluster} runs with wal_level = {wal_level}",
                           "set wal_level = logical and restart the primary before moving shards off it")
    if slots + 2 > max_slots:  # the move's own, and the one that tracks writes from its verification on
        raise RefusedError(f"{cluster} has not two free replication slots ({slots} of {max_slots} used)",
                           "raise max_replication_slots or drop unused slots")
    if senders >= max_senders:
        raise RefusedError(f"{cluster} has no free WAL sender ({senders} of {max_senders} busy)",
                           "raise max_wal_senders")


def plan_resume(fleet, move_id: int) -> tuple[MovePlan, MoveRecord]:
    with directory_session(fleet) as directory:
        record = Journal(directory).get(move_id)
    if record.status != ACTIVE:
        raise UsageError(f"move {move_id} is {record.status}: there is nothing to resume")
    return _plan_from_record(fleet, record, resume_point(record.step)), record


def _plan_from_record(fleet, record: MoveRecord, resume_after: str) -> MovePlan:
    model = fleet.model
    tables: list[TableSize] = []
    if resume_after in STEPS[:STEPS.index("switched")]:
        with primary_connection(fleet, record.source, model.postgres.database, autocommit=True,
                                purpose="shards") as connection:
            with connection.cursor() as cursor:
                tables = _table_sizes(cursor, record.schema_name) or _table_sizes(cursor, record.fenced_schema)
    return MovePlan(record.logical_shard, record.schema_name, record.source, record.target,
                    primary_of(fleet, record.source).name, primary_of(fleet, record.target).name,
                    model.postgres.database, tables, model.postgres.max_lag_bytes, record.id, resume_after)


def plan_abort(fleet, move_id: int) -> AbortPlan:
    with directory_session(fleet) as directory:
        record = Journal(directory).get(move_id)
        with directory.cursor() as cursor:
            cursor.execute("SELECT cluster FROM shard_map WHERE logical_shard = %s", (record.logical_shard,))
            placed = cursor.fetchone()
    if record.status != ACTIVE:
        raise UsageError(f"move {move_id} is {record.status}: there is nothing to abort")
    if STEPS.index(record.step) >= STEPS.index("switched") or (placed and placed[0] != record.source):
        raise RefusedError(f"move {move_id} has already switched shard {record.logical_shard} to {record.target}: "
                           "writes land there now, so the old copy cannot be brought back",
                           f"finish it with --resume {move_id}; to go back, move the shard to {record.source}")
    return AbortPlan(record.id, record.logical_shard, record.schema_name, record.source, record.target, record.step,
                     record.slot, record.fenced_schema)


class _Mover:
    """Runs a move's remaining steps. Each step first looks at what is already there, so
    running it twice (after a crash between doing it and journaling it) is harmless."""

    def __init__(self, fleet, plan: MovePlan, journal: Journal, reporter: Reporter, pause_after: str | None):
        self.fleet = fleet
        self.plan = plan
        self.journal = journal
        self.reporter = reporter
        self.pause_after = pause_after
        self.database = fleet.model.postgres.database
        self._source = None
        self._target = None
        self.result_fields: dict[str, Any] = {}
        self.verify_report: VerifyReport | None = None
        self.changes: ChangedRows | None = None  # from the verification on
        self.checked_rows = 0

    # connections to the primaries, autocommit, opened on first use
    @property
    def source(self):
        if self._source is None:
            self._source = connect(self.fleet, self.plan.source, self.database, autocommit=True, purpose="move")
        return self._source

    @property
    def target(self):
        if self._target is None:
            self._target = connect(self.fleet, self.plan.target, self.database, autocommit=True, purpose="move")
        return self._target

    def close(self) -> None:
        import psycopg2

        if self.changes is not None:
            try:
                self.changes.close()
            except psycopg2.Error:  # the slot goes with the session anyway
                pass
        for connection in (self._source, self._target):
            if connection is not None:
                connection.close()

    def pause(self, point: str) -> None:
        if self.pause_after == point:
            self.reporter.log(f"paused after {point} (--pause-after): kill igops now to rehearse a crash here; "
                              f"then `igops shard move --resume {self.plan.move_id}` or `--abort {self.plan.move_id}`")
            threading.Event().wait()

    def run(self) -> None:
        for step in self.plan.remaining():
            if step == "planned":
                self.pause("planned")
                continue
            with self.reporter.step(describe_step(self.plan, step)) as record:
                detail = getattr(self, f"_{step}")()
                record.detail = detail
            fields = self.result_fields.pop(step, {})
            if step == "cleaned":
                self.journal.finish(self.plan.move_id, DONE, step="cleaned", **fields)
            elif step == "switched":  # journaled with the map change itself; the timings follow
                self.journal.update(self.plan.move_id, **fields)
            else:
                self.journal.advance(self.plan.move_id, step, **fields)
            self.pause(step)

    # -- the steps -----------------------------------------------------------------------------
    def _target_ready(self) -> str:
        plan = self.plan
        template = read_ddl(self.fleet, "shard_ddl")
        connection = connect(self.fleet, plan.target, self.database, purpose="move")
        try:
            with connection.cursor() as cursor:
                act_as_owner(cursor)
                cursor.execute(shard_ddl(template, plan.schema, plan.shard))
                built = describe_schema(cursor, plan.schema)
                with self.source.cursor() as source_cursor:
                    original = describe_schema(source_cursor, plan.schema)
                if original is None:
                    raise IgopsError(f"{plan.source} has no schema {plan.schema} any more")
                diff = schema_diff(original, built, plan.source, plan.target)
                if diff:
                    raise RefusedError(f"{plan.target}'s {plan.schema} differs from {plan.source}'s: "
                                       + "; ".join(diff[:5]), f"roll back with --abort {plan.move_id}")
            connection.commit()
        finally:
            connection.close()
        return plural(len(built.tables), "table")

    def _published(self) -> str:
        from psycopg2 import sql

        with self.source.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (self.plan.slot,))
            if cursor.fetchone() is not None:
                return "already published"
            cursor.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLES IN SCHEMA {}").format(
                sql.Identifier(self.plan.slot), sql.Identifier(self.plan.schema)))
        return f"{self.plan.schema} published"

    def _copied(self) -> str:
        """Copy the tables at the slot's starting point, so the subscription takes over from
        exactly there. The snapshot lives only as long as this process: a copy cut short is
        started again from scratch (a new slot, emptied tables)."""
        plan = self.plan
        started = time.monotonic()
        with self.target.cursor() as cursor:
            drop_subscription(self.target, plan.slot)
            tables = tables_of(cursor, plan.schema)
            cursor.execute(sql_truncate(plan.schema, tables))
            with self.source.cursor() as source_cursor:
                builds = _deferrable_indexes(source_cursor, plan.schema)
            if builds:
                for statement in _drop_statements(cursor, plan.schema):
                    cursor.execute(statement)
        drop_publication_and_slot(self.source, plan.slot, keep_publication=True)
        replication = replication_connection(self.fleet, plan.source, self.database, plan.slot)
        try:
            with replication.cursor() as cursor:
                cursor.execute(f"CREATE_REPLICATION_SLOT {plan.slot} LOGICAL pgoutput (SNAPSHOT 'export')")
                _, consistent_point, snapshot, _ = cursor.fetchone()
                rows, size = self._copy_tables(tables, snapshot)
        finally:
            replication.close()
        copy_seconds = time.monotonic() - started
        if builds:
            self._build_indexes(builds)
        self.result_fields["copied"] = {"source_lsn": consistent_point, "rows_copied": rows, "bytes_copied": size}
        return (f"{rows:,} rows, {human_bytes(size)} in {copy_seconds:.1f} s"
                + (f"; {len(builds)} {'key or index' if len(builds) == 1 else 'keys and indexes'} in "
                   f"{time.monotonic() - started - copy_seconds:.1f} s"
                   if builds else ""))

    def _copy_tables(self, tables: list[str], snapshot: str) -> tuple[int, int]:
        """COPY each table out of the source under `snapshot` and into the target, through
        a pipe in this process, COPY_PARALLEL tables at a time, largest first."""
        plan = self.plan
        estimates = {table.name: table.rows for table in plan.tables}
        order = sorted(tables, key=lambda name: -estimates.get(name, 0))
        counter = _CopyCounter(self.reporter, plan.schema, sum(estimates.values()))
        with self.reporter.progress(f"copy {plan.schema}", sum(estimates.values()) or None, "rows") as advance:
            counter.advance = advance
            with ThreadPoolExecutor(max_workers=COPY_PARALLEL) as pool:
                for future in [pool.submit(self._copy_table, table, snapshot, counter) for table in order]:
                    future.result()
        return counter.rows, counter.bytes

    def _copy_table(self, table: str, snapshot: str, counter: _CopyCounter) -> None:
        """One table's COPY out of the source into the target. The target's transaction
        commits only when the source's COPY finished whole."""
        from psycopg2 import sql

        plan = self.plan
        name = sql.Identifier(plan.schema, table)
        reader = connect(self.fleet, plan.source, self.database, purpose="move")
        writer = connect(self.fleet, plan.target, self.database, purpose="move")
        read_end, write_end = os.pipe()
        sink = _CountingPipe(write_end, counter)

        def load() -> None:
            # Closing the read end on any failure makes the source side's next write fail
            # instead of blocking on a full pipe.
            with os.fdopen(read_end, "rb") as source, writer.cursor() as cursor:
                cursor.copy_expert(sql.SQL("COPY {} FROM STDIN").format(name).as_string(cursor), source,
                                   size=PIPE_BLOCK)

        try:
            reader.set_session(isolation_level="REPEATABLE READ", readonly=True)
            with reader.cursor() as cursor, ThreadPoolExecutor(max_workers=1) as pump:
                cursor.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
                loading = pump.submit(load)
                try:
                    cursor.copy_expert(sql.SQL("COPY {} TO STDOUT").format(name).as_string(cursor), sink)
                    sink.close()
                except BaseException:
                    sink.abandon()
                    if loading.exception() is not None:  # the target's failure is the cause
                        raise loading.exception() from None
                    raise
                loading.result()
            writer.commit()
        finally:
            sink.abandon()
            reader.close()
            writer.close()

    def _build_indexes(self, builds: list[tuple[str, str]]) -> None:
        """Keys first, then the other indexes, one connection per table, tables in parallel."""
        by_table: dict[str, list[str]] = {}
        for table, statement in builds:
            by_table.setdefault(table, []).append(statement)

        def build(statements: list[str]) -> None:
            connection = connect(self.fleet, self.plan.target, self.database, autocommit=True, purpose="move",
                                 settings={"maintenance_work_mem": "64MB"})
            try:
                with connection.cursor() as cursor:
                    for statement in statements:
                        cursor.execute(statement)
            finally:
                connection.close()

        with ThreadPoolExecutor(max_workers=COPY_PARALLEL) as pool:
            for future in [pool.submit(build, statements) for statements in by_table.values()]:
                future.result()

    def _subscribed(self) -> str:
        import psycopg2
        from psycopg2 import sql

        plan = self.plan
        with self.target.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (plan.slot,))
            if cursor.fetchone() is not None:
                return "already subscribed"
        # Its own session: the statement carries the source's password, so this session
        # logs no statements, and ends with it.
        connection = connect(self.fleet, plan.target, self.database, autocommit=True, purpose="move",
                             settings=QUIET_STATEMENT_LOGGING)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql.SQL("CREATE SUBSCRIPTION {name} CONNECTION %s PUBLICATION {name} "
                                       "WITH (create_slot = false, slot_name = %s, copy_data = false)").format(
                    name=sql.Identifier(plan.slot)),
                    (replication_conninfo(self.fleet, plan.source, self.database, plan.slot), plan.slot))
        except psycopg2.Error as exc:
            raise IgopsError(f"{plan.target} cannot subscribe to {plan.source}: {first_line(exc)}",
                             f"{plan.target_primary} must reach {plan.source_primary}:{self.fleet.model.postgres.port} "
                             f"as {self.fleet.model.postgres.user} (pg_hba.conf, the secret postgres_password)"
                             ) from None
        finally:
            connection.close()
        return f"{plan.target_primary} streams from {plan.source_primary}"

    def _check_workers(self, cursor, before: int | None) -> int:
        """Fail when the subscription's workers keep erroring (their messages are in the target's log), or when
        the slot they read is gone (a new source primary has no logical slots)."""
        cursor.execute("SELECT sync_error_count + apply_error_count FROM pg_stat_subscription_stats "
                       "WHERE subname = %s", (self.plan.slot,))
        row = cursor.fetchone()
        count = row[0] if row else 0
        if before is not None and count - before >= 3:
            raise IgopsError(f"the subscription's workers on {self.plan.target_primary} keep failing "
                             f"({plural(count, 'error')})",
                             f"read {self.plan.target_primary}'s Postgres log; then --resume or "
                             f"--abort {self.plan.move_id}")
        with self.source.cursor() as source_cursor:
            usable = _slot_usable(source_cursor, self.plan.slot)
        if usable is None:
            raise IgopsError(f"replication slot {self.plan.slot} is gone from {self.plan.source}",
                             f"the primary changed? --resume {self.plan.move_id} starts the copy again")
        if not usable:
            raise IgopsError(f"replication slot {self.plan.slot} on {self.plan.source} was invalidated: the target "
                             f"fell further behind than max_slot_wal_keep_size allows",
                             f"--resume {self.plan.move_id} starts the copy again")
        return count if before is None else before

    def _caught_up(self) -> str:
        plan = self.plan
        deadline = time.monotonic() + 600
        last_log = time.monotonic()
        errors_seen = None
        with self.target.cursor() as cursor, self.source.cursor() as source_cursor:
            while True:
                source_cursor.execute("SELECT pg_current_wal_lsn()")
                current = source_cursor.fetchone()[0]
                applied = _applied_lsn(cursor, plan.slot)
                if applied is not None:
                    source_cursor.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::bigint", (current, applied))
                    lag = max(0, source_cursor.fetchone()[0])
                    if lag <= plan.max_lag_bytes:
                        return f"{human_bytes(lag)} behind"
                    if time.monotonic() - last_log > 5:
                        last_log = time.monotonic()
                        self.reporter.log(f"catching up: {human_bytes(lag)} behind {plan.source}")
                errors_seen = self._check_workers(cursor, errors_seen)
                if time.monotonic() > deadline:
                    raise IgopsError(f"{plan.target} did not catch up with {plan.source} within 10 minutes",
                                     f"writes outpace the apply worker? --resume {plan.move_id} keeps waiting")
                time.sleep(0.1)

    def _verified(self) -> str:
        plan = self.plan
        if self._source_fenced():  # a move resumed after the fence: only the map is left to switch
            return f"{plan.source} already fenced: nothing to verify"
        # From before the copies are compared, every row written is known by its key: with
        # writes held, the cut-over compares those rows only.
        with self.source.cursor() as cursor:
            shape = describe_schema(cursor, plan.schema)
        self.changes = ChangedRows(self.source, f"{plan.slot}_changes", plan.slot, plan.schema,
                                   {name: table.primary_key for name, table in shape.tables.items()})
        self.changes.start()
        # The cut-over waits on this: an order-free row hash per table, a fifth of the cost of
        # the ordered checksums `igops shard verify` reports.
        report = self._holding_writes("verification", lambda: verify_copies(
            self.fleet, plan.shard, ShardCopy(plan.source, plan.schema), ShardCopy(plan.target, plan.schema),
            plan.slot, self.reporter, ordered=False))
        self.verify_report = report
        rows = sum(check.rows[f"{plan.source}/{plan.schema}"] for check in report.tables)
        if not report.equal:
            problems = report.schema_diff + [
                f"{check.table}: rows {check.rows}, first difference at {check.first_difference}"
                for check in report.tables if not check.equal]
            raise IgopsError(f"the copies of {plan.schema} differ: " + "; ".join(problems[:5]),
                             f"nothing was switched; investigate, then --resume {plan.move_id} to verify again "
                             f"or --abort {plan.move_id}")
        self.result_fields["verified"] = {"rows_copied": rows, "verify_pause_ms": report.pause_ms}
        return (f"{plural(len(report.tables), 'table')}, {rows:,} {'row' if rows == 1 else 'rows'} equal; "
                f"writes paused {report.pause_ms:.0f} ms")

    def _source_fenced(self) -> bool:
        """Whether the cut-over already renamed the source's copy (and committed it)."""
        with self.source.cursor() as cursor:
            cursor.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)",
                           ([self.plan.schema, self.plan.fenced_schema],))
            present = {row[0] for row in cursor.fetchall()}
        return self.plan.fenced_schema in present and self.plan.schema not in present

    def _switched(self) -> str:
        plan = self.plan
        if self._source_fenced():
            self.reporter.log(f"{plan.source} was already fenced ({plan.fenced_schema}): switching the map")
            # Nothing reaches the shard on the source since the fence: a mark written now is past
            # all of it, and is what the cleanup waits for the target to flush.
            with self.source.cursor() as cursor:
                version = self._flip_map(flushed_position(cursor))
            return f"shard map version {version}"
        self._check_clock_skew()
        timings = self._holding_writes("cut-over", self._cut_over)
        self._changes().close()
        self.result_fields["switched"] = timings
        return (f"{self.checked_rows:,} rows written since the verification equal; "
                f"writes blocked {timings['write_block_ms']:.0f} ms (lock wait {timings['lock_wait_ms']:.0f} ms); "
                f"shard map version {timings['map_version']}")

    def _holding_writes(self, what: str, action: Callable[[], Any]) -> Any:
        """Run a step that holds the shard's writes while the target applies the source's WAL.
        When the target is too far behind (WAL written since the catch-up, autovacuum after a
        bulk load, say), release the writes, catch up again and retry."""
        for attempt in range(1, CUTOVER_ATTEMPTS + 1):
            try:
                return action()
            except CutoverDeferred as exc:
                if attempt == CUTOVER_ATTEMPTS:
                    raise IgopsError(f"{what} gave up after {attempt} attempts: {exc.message}",
                                     f"writes were released each time; --resume {self.plan.move_id} tries again"
                                     ) from None
                self.reporter.log(f"{what} attempt {attempt}: {exc.message}; writes released, catching up again")
                self._caught_up()

    def _check_clock_skew(self) -> None:
        """Ids start with their server's clock: a target far behind the source would mint
        ids that sort before ones already issued."""
        readings = []
        for connection in (self.source, self.target):
            with connection.cursor() as cursor:
                before = time.time()
                cursor.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
                readings.append(cursor.fetchone()[0] - (before + time.time()) / 2)
        skew_ms = (readings[0] - readings[1]) * 1000
        if skew_ms > MAX_CLOCK_SKEW_MS:
            raise RefusedError(f"{self.plan.target_primary}'s clock is {skew_ms:.0f} ms behind "
                               f"{self.plan.source_primary}'s", "fix time synchronisation (NTP), then --resume")

    def _cut_over(self) -> dict[str, Any]:
        """The write block: from the lock request until the map names the target."""
        from psycopg2 import sql

        plan = self.plan
        locker = connect(self.fleet, plan.source, self.database, purpose="cutover", settings=LOCK_SETTINGS)
        directory = directory_connection(self.fleet, autocommit=False, purpose="cutover")
        try:
            with locker.cursor() as cursor, self.target.cursor() as target_cursor:
                tables = tables_of(cursor, plan.schema)
                # Most of what was written since the verification is read before writes are held.
                self._changes().drain()
                requested = time.monotonic()
                lock_tables(cursor, plan.schema, tables)
                locked = time.monotonic()
                self.pause("locked")
                with self.source.cursor() as marker:
                    lsn = wait_applied(target_cursor, plan.slot, marker, CUTOVER_CATCH_UP_S)
                checked = self._compare_changed_rows(target_cursor, lsn)
                shape = describe_schema(cursor, plan.schema)
                sequences = sequence_values(cursor, plan.schema, shape.sequences)
                for sequence, value in sequences.items():
                    target_cursor.execute("SELECT setval(%s, %s)",
                                          (f"{quote_ident(plan.schema)}.{quote_ident(sequence)}",
                                           value + SEQUENCE_MARGIN))
                cursor.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(
                    sql.Identifier(plan.schema), sql.Identifier(plan.fenced_schema)))
                version = self._stage_map_flip(directory, lsn)
                self._commit_fence(locker)
                self._wait_for_target_clock()
                self.pause("fenced")
                version = self._commit_map_flip(directory, version, lsn)
                switched = time.monotonic()
        except BaseException:
            _rollback_quietly(directory)
            _rollback_quietly(locker)
            raise
        finally:
            locker.close()
            directory.close()
        self.checked_rows = checked
        return {"lock_wait_ms": round((locked - requested) * 1000, 1),
                "write_block_ms": round((switched - requested) * 1000, 1),
                "map_version": version,
                "source_lsn": str(lsn),
                "source_sequence": max(sequences.values()) if sequences else None,
                "target_sequence": max(sequences.values()) + SEQUENCE_MARGIN if sequences else None}

    def _changes(self) -> ChangedRows:
        if self.changes is None:  # a resumed move verifies again: see resume_move
            raise IgopsError(f"move {self.plan.move_id} has no record of the rows written since its verification",
                             f"--resume {self.plan.move_id} verifies again")
        return self.changes

    def _compare_changed_rows(self, target_cursor, lsn: str) -> int:
        """With writes held and the target caught up to `lsn`: the rows written since the
        verification, by key, on both copies (the copies were equal at the verification, and
        no other row has changed on the source since). Costs what was written since, not the
        shard's size; returns the rows compared."""
        changes = self._changes()
        changes.drain(upto=lsn)
        with self.source.cursor() as source_cursor:
            checked, differences = changes.compare((source_cursor, target_cursor),
                                                   (self.plan.schema, self.plan.schema))
        if differences:
            raise IgopsError(f"the copies of {self.plan.schema} differ in rows written since the verification: "
                             + "; ".join(differences[:5]),
                             f"nothing was switched; --resume {self.plan.move_id} verifies again, or "
                             f"--abort {self.plan.move_id}")
        return checked

    def _commit_fence(self, locker) -> None:
        import psycopg2

        try:
            locker.commit()
        except psycopg2.Error as exc:
            raise IgopsError(f"committing the fence on {self.plan.source} failed ({first_line(exc)}): "
                             f"{self.plan.schema} may or may not be renamed there; the map is unchanged",
                             f"--resume {self.plan.move_id} finds out and finishes, or --abort {self.plan.move_id}"
                             ) from None

    def _commit_map_flip(self, directory, version: int, lsn: str) -> int:
        """The source is fenced now: until the map names the target the shard is unavailable,
        so a failed commit is retried on fresh connections before giving up."""
        import psycopg2

        try:
            directory.commit()
            return version
        except psycopg2.Error as exc:
            failure = first_line(exc)
        for _ in range(5):
            time.sleep(0.5)
            try:
                return self._flip_map(lsn)
            except (psycopg2.Error, IgopsError) as exc:
                failure = exc.one_line() if isinstance(exc, IgopsError) else first_line(exc)
        raise IgopsError(f"{self.plan.source} is fenced but the shard map could not be switched ({failure}): "
                         f"shard {self.plan.shard} is unavailable", f"igops shard move --resume {self.plan.move_id} "
                                                                    "as soon as the directory answers")

    def _stage_map_flip(self, directory, lsn: str) -> int:
        """The map change and its journal entry, left uncommitted so the commit right after the
        fence is the only thing between them. `lsn` lies past the shard's last change on the
        source: the cleanup drops nothing before the target has flushed up to it."""
        plan = self.plan
        with directory.cursor() as cursor:
            cursor.execute("UPDATE shard_map SET cluster = %s WHERE logical_shard = %s AND cluster = %s",
                           (plan.target, plan.shard, plan.source))
            if cursor.rowcount != 1:
                raise IgopsError(f"the shard map no longer places shard {plan.shard} on {plan.source}",
                                 "someone changed the map during the move; nothing was switched")
            cursor.execute("UPDATE shard_map_version SET version = version + 1, updated_at = now() RETURNING version")
            version = cursor.fetchone()[0]
            cursor.execute("UPDATE shard_moves SET step = 'switched', map_version = %s, source_lsn = %s, "
                           "updated_at = now(), error = NULL, history = history || jsonb_build_array("
                           "jsonb_build_object('step', 'switched', 'at', now())) WHERE id = %s",
                           (version, lsn, plan.move_id))
        return version

    def _flip_map(self, lsn: str) -> int:
        directory = directory_connection(self.fleet, autocommit=False, purpose="cutover")
        try:
            version = self._stage_map_flip(directory, lsn)
            directory.commit()
            return version
        finally:
            directory.close()

    def _wait_for_target_clock(self) -> None:
        """Until the target's clock has passed the last moment the source could mint an id,
        so every id minted at the new place sorts after every id minted at the old one."""
        with self.source.cursor() as cursor:
            cursor.execute("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
            fenced_at_ms = cursor.fetchone()[0]
        deadline = time.monotonic() + MAX_CLOCK_SKEW_MS / 1000 + 1
        with self.target.cursor() as cursor:
            while True:
                cursor.execute("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint > %s", (fenced_at_ms,))
                if cursor.fetchone()[0] or time.monotonic() > deadline:
                    return
                time.sleep(0.001)

    def _cleaned(self) -> str:
        from psycopg2 import sql

        plan = self.plan
        flushed = self._await_target_flush()
        drop_subscription(self.target, plan.slot)
        removed = drop_publication_and_slot(self.source, plan.slot)
        with self.source.cursor() as cursor:
            cursor.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(plan.fenced_schema)))
        return f"{flushed}; {removed}; old copy dropped"

    def _await_target_flush(self) -> str:
        """Until the target has flushed every change of the shard it applied: the subscription
        commits asynchronously (synchronous_commit = off), so a change applied can still be lost
        if the target crashes, and only the slot and the old copy could then bring it back. The
        slot's confirmed_flush_lsn is what the subscriber reports after flushing; the position to
        reach was journaled with the map switch."""
        plan = self.plan
        lsn = self.journal.get(plan.move_id).source_lsn
        deadline = time.monotonic() + FLUSH_WAIT_S
        with self.source.cursor() as cursor, self.target.cursor() as target_cursor:
            while True:
                cursor.execute("SELECT confirmed_flush_lsn >= %s::pg_lsn, confirmed_flush_lsn "
                               "FROM pg_replication_slots WHERE slot_name = %s", (lsn, plan.slot))
                row = cursor.fetchone()
                if row is None:  # dropped by a cleanup that got past this wait
                    return "no slot left"
                if row[0]:
                    return f"{plan.target} flushed up to {lsn}"
                target_cursor.execute("SELECT subenabled, subslotname IS NOT NULL FROM pg_subscription "
                                      "WHERE subname = %s", (plan.slot,))
                subscription = target_cursor.fetchone()
                state = ("missing" if subscription is None else "detached from its slot" if not subscription[1]
                         else None if subscription[0] else "disabled")
                waited = time.monotonic() > deadline
                if state or waited:
                    why = f"its subscription {plan.slot} is {state}" if state else \
                        f"not within {FLUSH_WAIT_S:.0f} s"
                    raise IgopsError(f"{plan.target} has not confirmed flushing the shard's changes up to {lsn} "
                                     f"(the slot is at {row[1]}), {why}: nothing was dropped",
                                     (f"ALTER SUBSCRIPTION {plan.slot} ENABLE on {plan.target_primary}, then "
                                      if state == "disabled" else f"read {plan.target_primary}'s Postgres log, then ")
                                     + f"igops shard move --resume {plan.move_id}")
                time.sleep(0.05)


def drop_subscription(connection, name: str) -> bool:
    """Drop a subscription without needing its publisher: detach it from its slot first (the
    slot is dropped on the source separately)."""
    from psycopg2 import sql

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (name,))
        if cursor.fetchone() is None:
            return False
        identifier = sql.Identifier(name)
        cursor.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(identifier))
        cursor.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(identifier))
        cursor.execute(sql.SQL("DROP SUBSCRIPTION {}").format(identifier))
    return True


def drop_publication_and_slot(connection, name: str, wait_s: float = 15, keep_publication: bool = False) -> str:
    """Drop the move's slot once no sender reads it (a disabled subscription's sender exits
    within moments) and its publication. A slot left behind would keep WAL forever."""
    from psycopg2 import sql

    dropped = []
    with connection.cursor() as cursor:
        deadline = time.monotonic() + wait_s
        while True:
            cursor.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,))
            row = cursor.fetchone()
            if row is None:
                break
            if row[0] is None:
                cursor.execute("SELECT pg_drop_replication_slot(%s)", (name,))
                dropped.append("slot")
                break
            if time.monotonic() > deadline:
                cursor.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                deadline = time.monotonic() + wait_s
            time.sleep(0.1)
        cursor.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,))
        if cursor.fetchone() is not None and not keep_publication:
            cursor.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(name)))
            dropped.append("publication")
    return (" and ".join(dropped) + " dropped") if dropped else "no slot or publication left"


class _CopyCounter:
    """Rows and bytes through every table's pipe, for the progress bar and a line every 5 s."""

    def __init__(self, reporter: Reporter, schema: str, expected_rows: int):
        self.reporter = reporter
        self.schema = schema
        self.expected_rows = expected_rows
        self.rows = 0
        self.bytes = 0
        self.advance: Callable[[float], None] = lambda amount: None
        self.lock = threading.Lock()
        self.logged = time.monotonic()

    def add(self, data: bytes) -> None:
        rows = data.count(b"\n")  # COPY's text format: one line a row, newlines in values escaped
        with self.lock:
            self.rows += rows
            self.bytes += len(data)
            log = time.monotonic() - self.logged > 5
            if log:
                self.logged = time.monotonic()
        self.advance(rows)
        if log:
            self.reporter.log(f"copying {self.schema}: {self.rows:,} of ~{self.expected_rows:,} rows, "
                              f"{human_bytes(self.bytes)}")


class _CountingPipe:
    """The write end of a pipe as the file psycopg2's COPY TO writes into. psycopg2 writes
    one row per call, so rows are gathered into blocks: the pipe, the counter and the
    progress bar see a block at a time, not a million rows one by one."""

    def __init__(self, fd: int, counter: _CopyCounter):
        self.fd = fd
        self.counter = counter
        self.block = bytearray()

    def write(self, data: bytes) -> int:
        self.block += data
        if len(self.block) >= PIPE_BLOCK:
            self._flush()
        return len(data)

    def _flush(self) -> None:
        view = memoryview(self.block)
        while view:
            view = view[os.write(self.fd, view):]
        view.release()
        self.counter.add(self.block)
        self.block.clear()

    def close(self) -> None:
        """Send what is gathered, then end the stream."""
        if self.fd is not None:
            self._flush()
            self.abandon()

    def abandon(self) -> None:
        """End the stream without sending the rest: the copy failed."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def sql_truncate(schema: str, tables: list[str]):
    from psycopg2 import sql

    return sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(sql.Identifier(schema, table) for table in tables))


def _deferrable_indexes(cursor, schema: str) -> list[tuple[str, str]]:
    """(table, statement) that build the schema's keys and indexes as the source has them:
    primary keys, then unique and exclusion constraints, then plain indexes. Empty when a
    foreign key involves the schema (its keys must then stay in place during the copy)."""
    cursor.execute("""
        SELECT count(*) FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace
         WHERE con.contype = 'f' AND (n.nspname = %s OR con.confrelid IN (
               SELECT c.oid FROM pg_class c JOIN pg_namespace m ON m.oid = c.relnamespace WHERE m.nspname = %s))""",
                   (schema, schema))
    if cursor.fetchone()[0]:
        return []
    cursor.execute("""
        SELECT c.relname, format('ALTER TABLE %%I.%%I ADD CONSTRAINT %%I %%s', n.nspname, c.relname, con.conname,
                                 pg_get_constraintdef(con.oid))
          FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %s AND con.contype IN ('p', 'u', 'x')
         ORDER BY con.contype <> 'p', c.relname, con.conname""", (schema,))
    builds = [tuple(row) for row in cursor.fetchall()]
    cursor.execute("""
        SELECT t.relname, pg_get_indexdef(i.indexrelid)
          FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
          JOIN pg_class ic ON ic.oid = i.indexrelid
         WHERE n.nspname = %s AND NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = i.indexrelid)
         ORDER BY t.relname, ic.relname""", (schema,))
    return builds + [tuple(row) for row in cursor.fetchall()]


def _drop_statements(cursor, schema: str) -> list[str]:
    """What removes every key and index of the schema's tables, so a bulk copy need not keep
    them up to date row by row."""
    cursor.execute("""
        SELECT format('ALTER TABLE %%I.%%I DROP CONSTRAINT %%I', n.nspname, c.relname, con.conname)
          FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %s AND con.contype IN ('p', 'u', 'x')
        UNION ALL
        SELECT format('DROP INDEX %%I.%%I', n.nspname, ic.relname)
          FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_namespace n ON n.oid = ic.relnamespace
         WHERE n.nspname = %s AND NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = i.indexrelid)""",
                   (schema, schema))
    return [row[0] for row in cursor.fetchall()]


def _rollback_quietly(connection) -> None:
    import psycopg2

    try:
        if not connection.closed:
            connection.rollback()
    except psycopg2.Error:
        pass


def start_move(fleet, plan: MovePlan, reporter: Reporter | None = None, pause_after: str | None = None) -> MoveResult:
    """Journal a new move and run it to the end."""
    directory = directory_connection(fleet, purpose="journal")
    try:
        journal = Journal(directory)
        journal.ensure()
        journal.hold_shard(plan.shard)
        record = journal.create(plan)
        plan.move_id = record.id
        return _drive(fleet, plan, journal, reporter or Reporter(), pause_after)
    finally:
        directory.close()


def resume_move(fleet, move_id: int, reporter: Reporter | None = None, pause_after: str | None = None) -> MoveResult:
    """Finish a move from its last journaled step. A move whose slot was lost (the source's
    primary changed) starts its copy again."""
    reporter = reporter or Reporter()
    directory = directory_connection(fleet, purpose="journal")
    try:
        journal = Journal(directory)
        record = journal.get(move_id)
        journal.hold_shard(record.logical_shard)
        record = journal.get(move_id)
        if record.status != ACTIVE:
            raise UsageError(f"move {move_id} is {record.status}: there is nothing to resume")
        resume_after = resume_point(record.step)
        if resume_after != record.step:
            reporter.log(f"move {move_id} stopped after its verification: the rows written since are known only to "
                         "the igops that verified, so it verifies again (unless the source is already fenced)")
        if STEPS.index("copied") <= STEPS.index(resume_after) < STEPS.index("switched") \
                and not _slot_usable_on_source(fleet, record):
            reporter.log(f"slot {record.slot} on {record.source} is gone (its primary changed?) or invalidated "
                         f"(max_slot_wal_keep_size): copying again")
            with primary_connection(fleet, record.target, fleet.model.postgres.database, autocommit=True,
                                    purpose="move") as connection:
                drop_subscription(connection, record.slot)
            journal.advance(move_id, "published")
            resume_after = "published"
        plan = _plan_from_record(fleet, record, resume_after)
        return _drive(fleet, plan, journal, reporter, pause_after)
    finally:
        directory.close()


def _slot_usable(cursor, slot: str) -> bool | None:
    """None when the slot does not exist; False when Postgres invalidated it (it no longer holds
    the WAL its subscriber needs)."""
    cursor.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    row = cursor.fetchone()
    return None if row is None else row[0] != "lost"


def _slot_usable_on_source(fleet, record: MoveRecord) -> bool:
    with primary_connection(fleet, record.source, fleet.model.postgres.database, autocommit=True,
                            purpose="move") as connection:
        with connection.cursor() as cursor:
            return bool(_slot_usable(cursor, record.slot))


def _drive(fleet, plan: MovePlan, journal: Journal, reporter: Reporter, pause_after: str | None) -> MoveResult:
    started = time.monotonic()
    mover = _Mover(fleet, plan, journal, reporter, pause_after)
    try:
        mover.run()
    except BaseException as exc:
        if isinstance(exc, Exception):
            message = exc.one_line() if isinstance(exc, IgopsError) else f"{type(exc).__name__}: {exc}"
            try:
                journal.fail(plan.move_id, message)
            except Exception:  # noqa: BLE001 - the original error matters more than the journal's
                pass
        raise
    finally:
        mover.close()
    record = journal.get(plan.move_id)
    return MoveResult(record.id, record.logical_shard, record.source, record.target, record.status,
                      record.map_version, record.rows_copied, record.bytes_copied, record.verify_pause_ms,
                      record.lock_wait_ms, record.write_block_ms, round((time.monotonic() - started) * 1000, 1),
                      mover.verify_report)


def abort_move(fleet, plan: AbortPlan, reporter: Reporter | None = None) -> MoveRecord:
    """Undo a move that has not switched: the source is restored (un-fenced if the cut-over
    got that far), every replication object and the partial copy are removed."""
    from psycopg2 import sql

    reporter = reporter or Reporter()
    directory = directory_connection(fleet, purpose="journal")
    try:
        journal = Journal(directory)
        journal.hold_shard(plan.shard)
        current = plan_abort(fleet, plan.move_id)
        database = fleet.model.postgres.database
        with reporter.step(current.steps()[0]) as step:
            with primary_connection(fleet, current.target, database, autocommit=True, purpose="move") as connection:
                dropped = drop_subscription(connection, current.slot)
                with connection.cursor() as cursor:
                    cursor.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(current.schema)))
            step.detail = "subscription dropped" if dropped else "no subscription"
        with reporter.step(current.steps()[1]) as step:
            with primary_connection(fleet, current.source, database, autocommit=True, purpose="move") as connection:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)",
                                   ([current.schema, current.fenced_schema],))
                    present = {row[0] for row in cursor.fetchall()}
                    restored = current.fenced_schema in present and current.schema not in present
                    if restored:
                        cursor.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(
                            sql.Identifier(current.fenced_schema), sql.Identifier(current.schema)))
                removed = drop_publication_and_slot(connection, current.slot)
            step.detail = ("un-fenced; " if restored else "") + removed
        with reporter.step(current.steps()[2]):
            journal.finish(current.move_id, ABORTED, error=f"aborted by {operator_label()}")
        return journal.get(current.move_id)
    finally:
        directory.close()


def list_moves(fleet, limit: int = 20, shard: int | None = None) -> list[MoveRecord]:
    """Recent moves, newest first; unfinished ones with the WAL their slot holds back."""
    if shard is not None:
        check_shard(fleet, shard)
    with directory_session(fleet) as directory:
        records = Journal(directory).recent(limit, shard)
    for record in records:
        if record.status != ACTIVE or record.source not in fleet.model.postgres.clusters:
            continue
        try:
            with primary_connection(fleet, record.source, fleet.model.postgres.database, autocommit=True,
                                    purpose="shards") as connection:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
                                   "FROM pg_replication_slots WHERE slot_name = %s", (record.slot,))
                    row = cursor.fetchone()
                    record.retained_wal_bytes = row[0] if row else None
        except IgopsError:
            record.retained_wal_bytes = None
    return records


# --- rebalancing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedMove:
    shard: int
    source: str
    target: str
    bytes: int


@dataclass
class RebalancePlan:
    by: str
    before: dict[str, int]  # cluster -> shards or bytes
    after: dict[str, int]
    moves: list[PlannedMove]

    def steps(self) -> list[str]:
        unit = (lambda value: f"{value} shards") if self.by == "shards" else human_bytes
        steps = [f"move shard {move.shard} ({human_bytes(move.bytes)}) from {move.source} to {move.target}"
                 for move in self.moves]
        return steps + ["then: " + ", ".join(f"{cluster} {unit(self.before[cluster])} -> {unit(self.after[cluster])}"
                                              for cluster in self.before)]


def plan_rebalance(placement: dict[int, str], clusters: list[str], by: str = "shards",
                   sizes: dict[int, int] | None = None, max_moves: int | None = None) -> RebalancePlan:
    """Greedy: while a move from the most to the least loaded cluster narrows the gap between
    them, make the one that narrows it most (ties: the smaller shard, then the lower id). Each
    move lowers the sum of squared loads, so this ends; each shard moves at most once."""
    if by not in ("shards", "bytes"):
        raise UsageError(f"cannot balance by {by!r}", "use --by shards or --by bytes")
    sizes = sizes or {}
    weight = (lambda shard: 1) if by == "shards" else (lambda shard: sizes.get(shard, 0))
    load = {cluster: 0 for cluster in clusters}
    members: dict[str, set[int]] = {cluster: set() for cluster in clusters}
    for shard, cluster in placement.items():
        load.setdefault(cluster, 0)
        members.setdefault(cluster, set()).add(shard)
        load[cluster] += weight(shard)
    before = dict(load)
    moves: list[PlannedMove] = []
    moved: set[int] = set()
    while clusters and (max_moves is None or len(moves) < max_moves):
        busiest = max(clusters, key=lambda cluster: (load[cluster], cluster))
        idlest = min(clusters, key=lambda cluster: (load[cluster], cluster))
        gap = load[busiest] - load[idlest]
        best = None
        for shard in members[busiest] - moved:
            amount = weight(shard)
            narrowed = abs((load[busiest] - amount) - (load[idlest] + amount))
            if amount > 0 and narrowed < gap:
                key = (narrowed, sizes.get(shard, 0), shard)
                if best is None or key < best[0]:
                    best = (key, shard, amount)
        if best is None:
            break
        _, shard, amount = best
        members[busiest].discard(shard)
        members[idlest].add(shard)
        load[busiest] -= amount
        load[idlest] += amount
        moved.add(shard)
        moves.append(PlannedMove(shard, busiest, idlest, sizes.get(shard, 0)))
    return RebalancePlan(by, before, dict(load), moves)


def rebalance_plan_for(fleet, by: str = "shards", max_moves: int | None = None) -> RebalancePlan:
    with directory_session(fleet) as directory:
        active = Journal(directory).active()
    if active:
        raise RefusedError("unfinished moves: " + ", ".join(f"{record.id} (shard {record.logical_shard})"
                                                            for record in active),
                           "finish them with --resume or --abort before rebalancing")
    current = read_map(fleet, sizes=True)
    unreachable = [load.cluster for load in current.clusters if load.bytes is None]
    if unreachable:
        raise IgopsError(f"cannot measure {', '.join(unreachable)}", "every cluster must answer to plan a rebalance")
    return plan_rebalance(current.placement(), list(fleet.model.postgres.clusters), by, current.sizes(), max_moves)


@dataclass
class RebalanceResult:
    planned: int
    results: list[MoveResult]
    failed: str | None


def run_rebalance(fleet, plan: RebalancePlan, reporter: Reporter | None = None) -> RebalanceResult:
    """The planned moves one at a time with the move code itself; stops at the first failure.
    Run as an operation, it leases every cluster, so no move of another operator overlaps it."""
    reporter = reporter or Reporter()
    results: list[MoveResult] = []
    for number, move in enumerate(plan.moves, 1):
        reporter.log(f"rebalance {number}/{len(plan.moves)}: shard {move.shard} {move.source} -> {move.target}")
        try:
            move_plan = plan_move(fleet, move.shard, move.target)
            results.append(start_move(fleet, move_plan, reporter))
        except IgopsError as exc:
            return RebalanceResult(len(plan.moves), results, f"shard {move.shard}: {exc.one_line()}")
    return RebalanceResult(len(plan.moves), results, None)
