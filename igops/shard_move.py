"""Online shard moves: the checks before a move (`plan_move`, `plan_resume`, `plan_abort`), the
runner of a move's remaining steps, and starting, resuming, aborting and listing moves. A shard
is copied by logical replication, caught up, verified, cut over behind a brief write lock and
switched in the map; every step is journaled in the directory (`shard_moves`) and idempotent,
so a move killed at any point can be resumed or aborted.

The steps and their plans are in shard_move_steps, the journal in shard_journal; the work of the
steps in shard_copy (the copy), shard_replication (publication, subscription, catch-up, cleanup)
and shard_cutover (verification and cut-over; the fence and the map switch in shard_switch),
sharing one shard_move_session.MoveSession."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from igops.errors import AlreadyRunning, IgopsError, RefusedError, UsageError, describe
from igops.operations import conflicts
from igops.output import Reporter, plural
from igops.postgres_admin import connect, primary_connection, primary_of
from igops.postgres_deadline import bounded
from igops.shard_copy import ShardCopier
from igops.shard_cutover import CutOver
from igops.shard_journal import ABORTED, ACTIVE, DONE, Journal, MoveRecord, operator_label
from igops.shard_locks import CUTOVER_DEADLINE, HOLD_LIMIT_S
from igops.shard_map import check_shard, directory_connection, directory_session, placement_of, schema_name
from igops.shard_move_session import MoveSession
from igops.shard_move_steps import STEPS, AbortPlan, MovePlan, TableSize, describe_step, resume_point
from igops.shard_replication import (
    await_target_flush,
    catch_up,
    drop_publication_and_slot,
    drop_subscription,
    publish,
    slot_usable,
    subscribe,
)
from igops.shard_schema import act_as_owner, describe_schema, read_ddl, schema_diff, shard_ddl
from igops.shard_switch import unfence
from igops.shard_verify import VerifyReport

if TYPE_CHECKING:
    from psycopg2.extensions import cursor as Cursor

    from igops.inventory import Fleet


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


def plan_move(fleet: Fleet, shard: int, target: str) -> MovePlan:
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
        raise IgopsError(
            f"the map places shard {shard} on {source}, which the inventory lacks",
            "add the cluster to [postgres.clusters]",
        )
    with directory_session(fleet) as directory:
        unfinished = Journal(directory).active_for(shard)
    if unfinished and unfinished.running:
        raise AlreadyRunning(
            f"move {unfinished.id} of shard {shard} ({unfinished.source} -> {unfinished.target}) "
            f"is already running, at {unfinished.step}",
            "wait for it: `igops shard moves`",
        )
    if unfinished:
        raise RefusedError(
            f"shard {shard} has an unfinished move {unfinished.id} ({unfinished.source} -> "
            f"{unfinished.target}, {unfinished.state} at {unfinished.step})",
            f"igops shard move --resume {unfinished.id}, or --abort {unfinished.id}",
        )
    schema = schema_name(fleet, shard)
    database = model.postgres.database
    template = read_ddl(fleet, "shard_ddl")
    with primary_connection(fleet, source, database, autocommit=True, purpose="shards") as connection:
        with connection.cursor() as cursor:
            source_shape = describe_schema(cursor, schema)
            if source_shape is None:
                raise IgopsError(
                    f"the map places shard {shard} on {source}, but {source} has no schema {schema}",
                    "check `igops shard moves` and `igops shard verify`",
                )
            keyless = [name for name, table in sorted(source_shape.tables.items()) if not table.primary_key]
            if keyless:
                raise RefusedError(
                    f"{schema} has tables without a primary key: {', '.join(keyless)}",
                    "logical replication needs one per table; add it first",
                )
            _check_replication_capacity(cursor, source)
            tables = _table_sizes(cursor, schema)
    with primary_connection(fleet, target, database, purpose="shards") as connection:
        with connection.cursor() as cursor:
            existing = describe_schema(cursor, schema)
            if existing is not None and any(_has_rows(cursor, schema, name) for name in existing.tables):
                raise RefusedError(
                    f"{target} already has a schema {schema} with rows in it",
                    f"a leftover copy? inspect it, drop it on {target_primary.name}, then retry",
                )
            act_as_owner(cursor)
            cursor.execute(shard_ddl(template, schema, shard))
            built = describe_schema(cursor, schema)
        connection.rollback()
    if built is None:
        raise RefusedError(
            f"the shard DDL builds no schema {schema} on {target}", "its statements must create the schema {schema}"
        )
    diff = schema_diff(source_shape, built, source, target)
    if diff:
        raise RefusedError(
            f"the shard DDL does not build on {target} the tables {schema} has on {source}: "
            + "; ".join(diff[:5])
            + (f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""),
            "make [shards] shard_ddl match the shard's tables (or drop what is extra), then retry",
        )
    return MovePlan(
        shard,
        schema,
        source,
        target,
        primary_of(fleet, source).name,
        target_primary.name,
        database,
        tables,
        model.postgres.max_lag_bytes,
    )


def _has_rows(cursor: Cursor, schema: str, table: str) -> bool:
    from psycopg2 import sql

    cursor.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(schema, table)))
    row = cursor.fetchone()
    assert row is not None  # a SELECT without FROM returns one row
    return bool(row[0])


def _table_sizes(cursor: Cursor, schema: str) -> list[TableSize]:
    """Rows from the planner's estimate, counted instead for tables never analysed."""
    from psycopg2 import sql

    cursor.execute(
        """
        SELECT c.relname, c.reltuples::bigint, pg_table_size(c.oid)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1""",
        (schema,),
    )
    sizes = []
    for name, rows, size in cursor.fetchall():
        if rows < 0:
            cursor.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name)))
            counted = cursor.fetchone()
            assert counted is not None  # an aggregate without GROUP BY returns one row
            rows = counted[0]
        sizes.append(TableSize(name, rows, size))
    return sizes


def _check_replication_capacity(cursor: Cursor, cluster: str) -> None:
    cursor.execute(
        "SELECT current_setting('wal_level'), current_setting('max_replication_slots')::int, "
        "(SELECT count(*) FROM pg_replication_slots), current_setting('max_wal_senders')::int, "
        "(SELECT count(*) FROM pg_stat_replication), current_setting('max_slot_wal_keep_size')"
    )
    row = cursor.fetchone()
    assert row is not None  # a SELECT without FROM returns one row
    wal_level, max_slots, slots, max_senders, senders, slot_wal_keep = row
    if wal_level != "logical":
        raise RefusedError(
            f"{cluster} runs with wal_level = {wal_level}",
            "set wal_level = logical and restart the primary before moving shards off it",
        )
    # The move's slot holds the source's WAL for as long as the target has not confirmed it
    # (a target down or stuck, a move left unfinished): unbounded, that fills the WAL volume and
    # stops the primary with every shard on it. Bounded, Postgres invalidates the slot instead
    # and a resumed move copies again.
    if slot_wal_keep == "-1":
        raise RefusedError(
            f"{cluster} runs with max_slot_wal_keep_size = -1: the move's replication slot could hold "
            "its WAL without bound and fill its WAL volume",
            f"set max_slot_wal_keep_size on {cluster}'s members to well under their WAL volume "
            "(ALTER SYSTEM SET max_slot_wal_keep_size = '…'; SELECT pg_reload_conf(): no restart), then retry",
        )
    if slots + 2 > max_slots:  # the move's own, and the one that tracks writes from its verification on
        raise RefusedError(
            f"{cluster} has not two free replication slots ({slots} of {max_slots} used)",
            "raise max_replication_slots or drop unused slots",
        )
    if senders >= max_senders:
        raise RefusedError(
            f"{cluster} has no free WAL sender ({senders} of {max_senders} busy)", "raise max_wal_senders"
        )


def move_resources(shard: int, source: str, target: str) -> list[tuple[str, str]]:
    """What a move of `shard` leases: the shard and both clusters (igops.operations.conflicts)."""
    return [conflicts.shard(shard), conflicts.pg_cluster(source), conflicts.pg_cluster(target)]


def plan_resume(fleet: Fleet, move_id: int) -> tuple[MovePlan, MoveRecord]:
    with directory_session(fleet) as directory:
        record = Journal(directory).get(move_id)
    if record.status != ACTIVE:
        raise UsageError(f"move {move_id} is {record.status}: there is nothing to resume")
    return _plan_from_record(fleet, record, resume_point(record.step)), record


def _plan_from_record(fleet: Fleet, record: MoveRecord, resume_after: str) -> MovePlan:
    model = fleet.model
    tables: list[TableSize] = []
    if resume_after in STEPS[: STEPS.index("switched")]:
        with primary_connection(
            fleet, record.source, model.postgres.database, autocommit=True, purpose="shards"
        ) as connection:
            with connection.cursor() as cursor:
                tables = _table_sizes(cursor, record.schema_name) or _table_sizes(cursor, record.fenced_schema)
    return MovePlan(
        record.logical_shard,
        record.schema_name,
        record.source,
        record.target,
        primary_of(fleet, record.source).name,
        primary_of(fleet, record.target).name,
        model.postgres.database,
        tables,
        model.postgres.max_lag_bytes,
        record.id,
        resume_after,
    )


def plan_abort(fleet: Fleet, move_id: int) -> AbortPlan:
    with directory_session(fleet) as directory:
        record = Journal(directory).get(move_id)
        with directory.cursor() as cursor:
            cursor.execute("SELECT cluster FROM shard_map WHERE logical_shard = %s", (record.logical_shard,))
            placed = cursor.fetchone()
    if record.status != ACTIVE:
        raise UsageError(f"move {move_id} is {record.status}: there is nothing to abort")
    if STEPS.index(record.step) >= STEPS.index("switched") or (placed and placed[0] != record.source):
        raise RefusedError(
            f"move {move_id} has already switched shard {record.logical_shard} to {record.target}: "
            "writes land there now, so the old copy cannot be brought back",
            f"finish it with --resume {move_id}; to go back, move the shard to {record.source}",
        )
    return AbortPlan(
        record.id,
        record.logical_shard,
        record.schema_name,
        record.source,
        record.target,
        record.step,
        record.slot,
        record.fenced_schema,
    )


class _Mover:
    """Runs a move's remaining steps. Each step first looks at what is already there, so
    running it twice (after a crash between doing it and journaling it) is harmless. The steps
    share one MoveSession; the copy is a ShardCopier's, the verification and the cut-over a
    CutOver's, and the replication objects and waits are shard_replication's."""

    def __init__(self, fleet: Fleet, plan: MovePlan, journal: Journal, reporter: Reporter, pause_after: str | None):
        self.fleet = fleet
        self.plan = plan
        self.journal = journal
        self.reporter = reporter
        self.database = fleet.model.postgres.database
        self.session = MoveSession(fleet, plan, reporter, pause_after)
        self.cut_over = CutOver(self.session)
        self.actions: dict[str, Callable[[], str]] = {
            "target_ready": self._target_ready,
            "published": lambda: publish(self.session),
            "copied": ShardCopier(self.session).run,
            "subscribed": lambda: subscribe(self.session),
            "caught_up": lambda: catch_up(self.session),
            "verified": self.cut_over.verify,
            "switched": self.cut_over.switch,
            "cleaned": self._cleaned,
        }

    @property
    def verify_report(self) -> VerifyReport | None:
        return self.cut_over.verify_report

    def close(self) -> None:
        self.cut_over.close()
        self.session.close()

    def run(self) -> None:
        move_id = self.plan.move_id
        assert move_id is not None  # start_move and resume_move journal the move before driving it
        for step in self.plan.remaining():
            if step == "planned":
                self.session.pause("planned")
                continue
            with self.reporter.step(describe_step(self.plan, step)) as record:
                detail = self.actions[step]()
                record.detail = detail
            fields = self.session.result_fields.pop(step, {})
            if step == "cleaned":
                self.journal.finish(move_id, DONE, step="cleaned", **fields)
            elif step == "switched":  # journaled with the map change itself; the timings follow
                self.journal.update(move_id, **fields)
            else:
                self.journal.advance(move_id, step, **fields)
            self.session.pause(step)

    def _target_ready(self) -> str:
        plan = self.plan
        template = read_ddl(self.fleet, "shard_ddl")
        connection = connect(self.fleet, plan.target, self.database, purpose="move")
        try:
            with connection.cursor() as cursor:
                act_as_owner(cursor)
                cursor.execute(shard_ddl(template, plan.schema, plan.shard))
                built = describe_schema(cursor, plan.schema)
                if built is None:
                    raise RefusedError(
                        f"the shard DDL builds no schema {plan.schema} on {plan.target}",
                        "its statements must create the schema {schema}",
                    )
                with self.session.source.cursor() as source_cursor:
                    original = describe_schema(source_cursor, plan.schema)
                if original is None:
                    raise IgopsError(f"{plan.source} has no schema {plan.schema} any more")
                diff = schema_diff(original, built, plan.source, plan.target)
                if diff:
                    raise RefusedError(
                        f"{plan.target}'s {plan.schema} differs from {plan.source}'s: " + "; ".join(diff[:5]),
                        f"roll back with --abort {plan.move_id}",
                    )
            connection.commit()
        finally:
            connection.close()
        return plural(len(built.tables), "table")

    def _cleaned(self) -> str:
        from psycopg2 import sql

        plan = self.plan
        flushed = await_target_flush(self.session, self.journal)
        drop_subscription(self.session.target, plan.slot)
        removed = drop_publication_and_slot(self.session.source, plan.slot)
        with self.session.source.cursor() as cursor:
            cursor.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(plan.fenced_schema)))
        return f"{flushed}; {removed}; old copy dropped"


def start_move(
    fleet: Fleet, plan: MovePlan, reporter: Reporter | None = None, pause_after: str | None = None
) -> MoveResult:
    """Journal a new move and run it to the end."""
    directory = directory_connection(fleet, purpose="journal")
    try:
        journal = Journal(directory)
        journal.ensure()
        journal.hold_shard(plan.shard)
        record = journal.create(plan)
        plan.move_id = record.id
        reporter = reporter or Reporter()
        reporter.fact(move=record.id)
        return _drive(fleet, plan, journal, reporter, pause_after)
    finally:
        directory.close()


def resume_move(
    fleet: Fleet, move_id: int, reporter: Reporter | None = None, pause_after: str | None = None
) -> MoveResult:
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
            reporter.log(
                f"move {move_id} stopped after its verification: the rows written since are known only to "
                "the igops that verified, so it verifies again (unless the source is already fenced)"
            )
        lost = _replication_lost(fleet, record, resume_after)
        if lost:
            reporter.log(f"{lost}: publishing and copying again")
            with primary_connection(
                fleet, record.target, fleet.model.postgres.database, autocommit=True, purpose="move"
            ) as connection:
                drop_subscription(connection, record.slot)
            # From the publication on (it is there again at once when only the slot went).
            journal.advance(move_id, "target_ready")
            resume_after = "target_ready"
        plan = _plan_from_record(fleet, record, resume_after)
        return _drive(fleet, plan, journal, reporter, pause_after)
    finally:
        directory.close()


def _replication_lost(fleet: Fleet, record: MoveRecord, resume_after: str) -> str | None:
    """Why a move resumed before its switch must publish and copy again, if it must: its slot
    is gone (the source's primary changed: logical slots do not move with a failover) or
    invalidated (max_slot_wal_keep_size), or its publication is gone (an abort that could not
    reach the target dropped the source's slot and publication and left the move unfinished)."""
    done = STEPS.index(resume_after)
    if not STEPS.index("published") <= done < STEPS.index("switched"):
        return None
    with primary_connection(
        fleet, record.source, fleet.model.postgres.database, autocommit=True, purpose="move"
    ) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (record.slot,))
            if cursor.fetchone() is None:
                return f"publication {record.slot} is gone from {record.source} (an unfinished --abort?)"
            if done >= STEPS.index("copied") and not slot_usable(cursor, record.slot):
                return (
                    f"slot {record.slot} on {record.source} is gone (its primary changed?) or invalidated "
                    "(max_slot_wal_keep_size)"
                )
    return None


def _drive(fleet: Fleet, plan: MovePlan, journal: Journal, reporter: Reporter, pause_after: str | None) -> MoveResult:
    move_id = plan.move_id
    assert move_id is not None  # start_move and resume_move journal the move before driving it
    started = time.monotonic()
    mover = _Mover(fleet, plan, journal, reporter, pause_after)
    try:
        mover.run()
    except BaseException as exc:
        if isinstance(exc, Exception):
            message = exc.one_line() if isinstance(exc, IgopsError) else f"{type(exc).__name__}: {exc}"
            try:
                # A cut-over that failed may leave the move's journal row locked by a directory
                # session that hung, or the directory may be what hung: the error must still reach
                # the operator. (The journal's connection holds the shard's move lock for the
                # whole move, through network blips: the deadline is set for this write only.)
                with bounded([journal.connection], CUTOVER_DEADLINE, HOLD_LIMIT_S):
                    journal.fail(move_id, message)
            except Exception:  # noqa: BLE001 - the original error matters more than the journal's
                pass
        raise
    finally:
        mover.close()
    record = journal.get(move_id)
    return MoveResult(
        record.id,
        record.logical_shard,
        record.source,
        record.target,
        record.status,
        record.map_version,
        record.rows_copied,
        record.bytes_copied,
        record.verify_pause_ms,
        record.lock_wait_ms,
        record.write_block_ms,
        round((time.monotonic() - started) * 1000, 1),
        mover.verify_report,
    )


def abort_move(fleet: Fleet, plan: AbortPlan, reporter: Reporter | None = None) -> MoveRecord:
    """Undo a move that has not switched: the source is restored (un-fenced if the cut-over
    got that far), every replication object and the partial copy are removed. A target that does
    not accept writes (down, say, its disk full) keeps its subscription and copy, which another
    abort drops; the source's slot and publication are dropped regardless, as the slot would
    otherwise hold the source's WAL, and with it every shard there, hostage to the target."""
    from psycopg2 import sql

    reporter = reporter or Reporter()
    directory = directory_connection(fleet, purpose="journal")
    try:
        journal = Journal(directory)
        journal.hold_shard(plan.shard)
        current = plan_abort(fleet, plan.move_id)
        database = fleet.model.postgres.database
        steps = current.steps()
        # The source is made writable first: an abort cut off after it leaves the shard served
        # where the map places it, and a resume that finds the source not fenced verifies again.
        with reporter.step(steps[0]) as step:
            with primary_connection(
                fleet, current.source, database, autocommit=True, purpose="move", deadline=CUTOVER_DEADLINE
            ) as connection:
                fenced = unfence(connection, current.schema, current.fenced_schema)
                step.detail = "un-fenced" if fenced else "not fenced"
        # The target's subscription goes before the slot it reads (dropping a slot a sender still
        # reads waits for that sender); when the target cannot be reached, the source's cleanup
        # below goes on without it.
        target_failure = None
        with reporter.step(steps[1]) as step:
            try:
                with primary_connection(fleet, current.target, database, autocommit=True, purpose="move") as connection:
                    dropped = drop_subscription(connection, current.slot)
                    with connection.cursor() as cursor:
                        cursor.execute(
                            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(current.schema))
                        )
                step.detail = "subscription dropped" if dropped else "no subscription"
            except Exception as exc:  # noqa: BLE001 - whatever stops it, the source's slot must still go
                target_failure = exc.message if isinstance(exc, IgopsError) else describe(exc)
                step.status = "failed"
                step.detail = f"left for another --abort {current.move_id}: {describe(exc)}"
        with reporter.step(steps[2]) as step:
            with primary_connection(fleet, current.source, database, autocommit=True, purpose="move") as connection:
                step.detail = drop_publication_and_slot(connection, current.slot)
        with reporter.step(steps[3]) as step:
            if target_failure is None:
                journal.finish(current.move_id, ABORTED, error=f"aborted by {operator_label()}")
            else:
                failure = IgopsError(
                    f"abort of move {current.move_id} unfinished: {current.target} may still hold "
                    + " and ".join(current.left_on_target())
                    + f" ({target_failure}); shard {current.shard} is served on {current.source}, whose slot "
                    f"and publication {current.slot} are dropped",
                    f"once {current.target} accepts writes (`igops pg status {current.target}`), "
                    f"`igops shard move --abort {current.move_id}` again drops them",
                )
                journal.fail(current.move_id, failure.one_line())
                step.status = "failed"
                step.detail = "the move stays unfinished (failed)"
                raise failure
        return journal.get(current.move_id)
    finally:
        directory.close()


def list_moves(fleet: Fleet, limit: int = 20, shard: int | None = None) -> list[MoveRecord]:
    """Recent moves, newest first; unfinished ones with the WAL their slot holds back."""
    if shard is not None:
        check_shard(fleet, shard)
    with directory_session(fleet) as directory:
        records = Journal(directory).recent(limit, shard)
    for record in records:
        if record.status != ACTIVE or record.source not in fleet.model.postgres.clusters:
            continue
        try:
            with primary_connection(
                fleet, record.source, fleet.model.postgres.database, autocommit=True, purpose="shards"
            ) as connection:
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
                        "FROM pg_replication_slots WHERE slot_name = %s",
                        (record.slot,),
                    )
                    row = cursor.fetchone()
                    record.retained_wal_bytes = row[0] if row else None
        except IgopsError:
            record.retained_wal_bytes = None
    return records
