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
connections in shard_map, schema shapes and the shard DDL in shard_schema.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
from igops.safety import operator_host, operator_user
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
from igops.shard_schema import (
    TableShape,
    act_as_owner,
    describe_schema,
    read_ddl,
    schema_diff,
    sequence_values,
    shard_ddl,
    tables_of,
)

CHUNK_ROWS = 100_000


@dataclass
class TableCheck:
    table: str
    rows: dict[str, int]  # copy label -> rows
    checksum: dict[str, str]  # copy label -> md5 over the ordered chunk digests, or the XOR row hash
    equal: bool
    first_difference: str | None = None  # the first key range whose chunks differ


@dataclass
class VerifyReport:
    shard: int
    copies: list[str]  # "cluster/schema" of each copy compared
    consistent: bool  # both copies read at one point of the stream
    tables: list[TableCheck]
    sequences: dict[str, dict[str, int]]  # copy label -> sequence -> last value
    schema_diff: list[str]
    pause_ms: float | None
    equal: bool


@dataclass(frozen=True)
class ShardCopy:
    cluster: str
    schema: str

    @property
    def label(self) -> str:
        return f"{self.cluster}/{self.schema}"


def _digest_table(cursor, schema: str, shape: TableShape, bounds: list[Any]) -> tuple[int, str, list[str]]:
    """Rows and md5 of a table in key order, computed in key-range chunks so no single
    aggregate holds the whole table."""
    from psycopg2 import sql

    table = sql.Identifier(schema, shape.name)
    order = sql.SQL(", ").join(sql.Identifier(column) for column in shape.primary_key)
    first = sql.Identifier(shape.primary_key[0])
    chunk_digests: list[str] = []
    total = 0
    edges = [None, *bounds, None]
    for low, high in zip(edges, edges[1:], strict=False):
        where = []
        params: list[Any] = []
        if low is not None:
            where.append(sql.SQL("{} >= %s").format(first))
            params.append(low)
        if high is not None:
            where.append(sql.SQL("{} < %s").format(first))
            params.append(high)
        # The rows come in key order from the subquery (an index scan, no sort); an ordered
        # aggregate would sort them again.
        query = sql.SQL("SELECT count(*), coalesce(md5(string_agg(r::text, '|')), '') "
                        "FROM (SELECT t AS r FROM {table} AS t{where} ORDER BY {order}) AS ordered").format(
            order=order, table=table,
            where=sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""))
        cursor.execute(query, params)
        rows, digest = cursor.fetchone()
        total += rows
        chunk_digests.append(digest)
    return total, hashlib.md5("|".join(chunk_digests).encode()).hexdigest(), chunk_digests


def _chunk_bounds(cursor, schema: str, shape: TableShape) -> list[Any]:
    """Every CHUNK_ROWS-th value of the first key column: chunk edges both copies share."""
    from psycopg2 import sql

    cursor.execute(sql.SQL("SELECT k FROM (SELECT {column} AS k, row_number() OVER (ORDER BY {column}) AS n "
                           "FROM {table}) AS numbered WHERE n %% %s = 0").format(
        column=sql.Identifier(shape.primary_key[0]), table=sql.Identifier(schema, shape.name)), (CHUNK_ROWS,))
    return sorted({row[0] for row in cursor.fetchall()})


def _hash_table(cursor, schema: str, shape: TableShape) -> tuple[int, str]:
    """Rows and an order-free digest of a table: the XOR of every row's 64-bit hash. A primary
    key lets no row appear twice, so a missing, extra or changed row changes the digest (but
    for a 2**-64 chance), for a fifth of the cost of hashing the rows in key order."""
    from psycopg2 import errors, sql

    table = sql.Identifier(schema, shape.name)
    query = "SELECT count(*), coalesce(bit_xor({}), 0) FROM {} AS t"
    cursor.execute("SAVEPOINT igops_row_hash")
    try:
        cursor.execute(sql.SQL(query).format(sql.SQL("hash_record_extended(t, 0)"), table))
    except errors.UndefinedFunction:
        # A column type without a hash function (json, point): hash the row's text instead.
        cursor.execute("ROLLBACK TO SAVEPOINT igops_row_hash")
        cursor.execute(sql.SQL(query).format(sql.SQL("hashtextextended(t::text, 0)"), table))
    rows, digest = cursor.fetchone()
    cursor.execute("RELEASE SAVEPOINT igops_row_hash")
    return rows, f"{digest & (2**64 - 1):016x}"


def compare_snapshots(shard: int, copies: tuple[ShardCopy, ShardCopy], cursors: tuple[Any, Any],
                      consistent: bool, pause_ms: float | None, ordered: bool = True) -> VerifyReport:
    """Compare two copies through cursors whose transactions already hold the snapshots to
    read (REPEATABLE READ), each copy's work in its own thread. Ordered: md5 of the rows in
    key order, by key-range chunks. Otherwise an order-free row hash per table, and the
    ordered chunks only for a table whose hashes differ, to name where."""
    shapes = [describe_schema(cursor, copy.schema) for cursor, copy in zip(cursors, copies, strict=False)]
    for shape, copy in zip(shapes, copies, strict=False):
        if shape is None:
            raise IgopsError(f"{copy.label} does not exist", "check the shard and the cluster")
    left, right = copies
    diff = schema_diff(*shapes, left.cluster, right.cluster) if left.cluster != right.cluster \
        else schema_diff(*shapes, left.label, right.label)
    comparable = [name for name in sorted(shapes[0].tables)
                  if name in shapes[1].tables and shapes[0].tables[name].primary_key
                  and shapes[0].tables[name].primary_key == shapes[1].tables[name].primary_key
                  and shapes[0].tables[name].columns == shapes[1].tables[name].columns]

    def on_both(digest, names: list[str]) -> list[dict[str, tuple[int, str, list[str]]]]:
        if not names:
            return [{}, {}]
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(lambda index: {name: digest(index, name) for name in names}, (0, 1)))

    def in_key_order(index: int, name: str) -> tuple[int, str, list[str]]:
        return _digest_table(cursors[index], copies[index].schema, shapes[index].tables[name], bounds[name])

    def row_hash(index: int, name: str) -> tuple[int, str, list[str]]:
        return (*_hash_table(cursors[index], copies[index].schema, shapes[index].tables[name]), [])

    if ordered:
        bounds = {name: _chunk_bounds(cursors[0], left.schema, shapes[0].tables[name]) for name in comparable}
        results = on_both(in_key_order, comparable)
    else:
        results = on_both(row_hash, comparable)
        differing = [name for name in comparable if results[0][name][1] != results[1][name][1]]
        bounds = {name: _chunk_bounds(cursors[0], left.schema, shapes[0].tables[name]) for name in differing}
        located = on_both(in_key_order, differing)
        for index, name in itertools.product((0, 1), differing):
            rows, digest, _ = results[index][name]
            results[index][name] = (rows, digest, located[index][name][2])
    tables = []
    for name in comparable:
        (rows_a, sum_a, chunks_a), (rows_b, sum_b, chunks_b) = results[0][name], results[1][name]
        difference = None
        if sum_a != sum_b:
            edges = [None, *bounds[name], None]
            index = next((i for i, (a, b) in enumerate(zip(chunks_a, chunks_b, strict=False)) if a != b), None)
            if index is not None:
                low, high = edges[index], edges[index + 1]
                difference = (f"{shapes[0].tables[name].primary_key[0]} in "
                              f"[{'-inf' if low is None else low}, {'+inf' if high is None else high})")
        tables.append(TableCheck(name, {left.label: rows_a, right.label: rows_b},
                                 {left.label: sum_a, right.label: sum_b}, sum_a == sum_b, difference))
    sequences = {copy.label: sequence_values(cursor, copy.schema, shape.sequences)
                 for cursor, copy, shape in zip(cursors, copies, shapes, strict=False)}
    equal = not diff and all(check.equal for check in tables)
    return VerifyReport(shard, [left.label, right.label], consistent, tables, sequences, diff, pause_ms, equal)


@dataclass
class ShapeReport:
    shard: int
    copy: str
    tables: list[TableCheck]
    sequences: dict[str, int]
    schema_diff: list[str]  # against the service's shard DDL
    equal: bool


def verify_in_place(fleet, shard: int) -> ShapeReport:
    """One copy: its per-table rows and checksums, sequences, and its difference from what
    the service's shard DDL creates (built in a transaction that is rolled back)."""
    check_shard(fleet, shard)
    placement = placement_of(fleet, shard)
    schema = schema_name(fleet, shard)
    copy = ShardCopy(placement, schema)
    template = read_ddl(fleet, "shard_ddl")
    with primary_connection(fleet, placement, fleet.model.postgres.database, purpose="shards",
                            settings={"max_parallel_workers_per_gather": 0}) as connection:
        connection.set_session(isolation_level="REPEATABLE READ")
        with connection.cursor() as cursor:
            shape = describe_schema(cursor, schema)
            if shape is None:
                raise IgopsError(f"the map places shard {shard} on {placement}, which has no schema {schema}",
                                 "check `igops shard moves` for an unfinished move")
            checks = []
            for name, table in sorted(shape.tables.items()):
                if not table.primary_key:
                    continue
                rows, digest, _ = _digest_table(cursor, schema, table, _chunk_bounds(cursor, schema, table))
                checks.append(TableCheck(name, {copy.label: rows}, {copy.label: digest}, True))
            sequences = sequence_values(cursor, schema, shape.sequences)
            cursor.execute("SAVEPOINT ddl_probe")
            probe = f"igops_ddl_probe_{os.getpid()}"
            cursor.execute(shard_ddl(template, probe, shard))
            expected = describe_schema(cursor, probe)
            cursor.execute("ROLLBACK TO SAVEPOINT ddl_probe")
        connection.rollback()
    diff = schema_diff(expected, shape, "the shard DDL", copy.label)
    diff += [f"table {name} has no primary key (logical replication cannot move it)"
             for name, table in sorted(shape.tables.items()) if not table.primary_key]
    return ShapeReport(shard, copy.label, checks, sequences, diff, not diff)


def verify_against(fleet, shard: int, against: str, reporter: Reporter | None = None) -> VerifyReport:
    """The shard's copy where the map places it against the copy on another cluster. While a
    move replicates between them, both are read at one point of the stream (writes to the
    shard pause for an instant); otherwise each is read as it is."""
    reporter = reporter or Reporter()
    check_shard(fleet, shard)
    source = placement_of(fleet, shard)
    primary_of(fleet, against)
    if against == source:
        raise UsageError(f"shard {shard} is on {against}: there is no other copy to compare",
                         "name the cluster holding the other copy")
    schema = schema_name(fleet, shard)
    with directory_session(fleet) as directory:
        active = Journal(directory).active_for(shard)
    subscription = None
    if active and active.target == against and active.source == source \
            and STEPS.index(active.step) >= STEPS.index("subscribed"):
        subscription = active.slot
    return verify_copies(fleet, shard, ShardCopy(source, schema), ShardCopy(against, schema), subscription, reporter)


def verify_copies(fleet, shard: int, source: ShardCopy, target: ShardCopy, subscription: str | None,
                  reporter: Reporter, wait_budget_s: float = 2.0, ordered: bool = True) -> VerifyReport:
    database = fleet.model.postgres.database
    # Rows must reach each checksum in key order: no parallel plans.
    serial = {"max_parallel_workers_per_gather": 0}
    source_reader = connect(fleet, source.cluster, database, purpose="verify", settings=serial)
    target_reader = connect(fleet, target.cluster, database, purpose="verify", settings=serial)
    try:
        for connection in (source_reader, target_reader):
            connection.set_session(isolation_level="REPEATABLE READ", readonly=True)
        pause_ms = None
        if subscription:
            pause_ms = _matching_snapshots(fleet, source, target, subscription, source_reader, target_reader,
                                           wait_budget_s)
            reporter.log(f"snapshots taken; writes to {source.schema} paused {pause_ms:.0f} ms")
        with source_reader.cursor() as left, target_reader.cursor() as right:
            if not subscription:
                left.execute("SELECT 1")
                right.execute("SELECT 1")
            return compare_snapshots(shard, (source, target), (left, right), subscription is not None, pause_ms,
                                     ordered)
    finally:
        source_reader.close()
        target_reader.close()


def _matching_snapshots(fleet, source: ShardCopy, target: ShardCopy, subscription: str, source_reader,
                        target_reader, wait_budget_s: float) -> float:
    """Start the two readers' snapshots at one point of the replication stream: hold writes
    to the source's tables, wait until the target has applied everything before that point,
    snapshot both, let writes go."""
    database = fleet.model.postgres.database
    locker = connect(fleet, source.cluster, database, autocommit=True, purpose="verify", settings=LOCK_SETTINGS)
    marker = connect(fleet, source.cluster, database, autocommit=True, purpose="verify")
    watcher = connect(fleet, target.cluster, database, autocommit=True, purpose="verify")
    try:
        with locker.cursor() as cursor:
            tables = tables_of(cursor, source.schema)
        locker.autocommit = False
        locker.set_session(isolation_level="REPEATABLE READ")
        with locker.cursor() as cursor, marker.cursor() as mark, watcher.cursor() as watch, \
                source_reader.cursor() as left, target_reader.cursor() as right:
            started = time.monotonic()
            lock_tables(cursor, source.schema, tables)
            cursor.execute("SELECT pg_export_snapshot()")
            snapshot = cursor.fetchone()[0]
            wait_applied(watch, subscription, mark, wait_budget_s)
            right.execute("SELECT 1")
            left.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
            locker.rollback()
            return (time.monotonic() - started) * 1000
    finally:
        locker.close()
        marker.close()
        watcher.close()


# --- replication plumbing ---------------------------------------------------------------------
# The cut-over's lock must never wait long (writers queue behind a waiting lock), and its
# transaction must die with igops: the server ends it if igops stops talking, releasing writes.
LOCK_TIMEOUT_MS = 1000
LOCK_SETTINGS = {"lock_timeout": f"{LOCK_TIMEOUT_MS}ms", "idle_in_transaction_session_timeout": "10s",
                  "statement_timeout": "30s"}


def lock_tables(cursor, schema: str, tables: list[str]) -> None:
    """Block writes, not reads. It must be the transaction's first statement when the
    transaction's snapshot is to show everything committed before the lock. A lock that
    cannot be had within lock_timeout defers the attempt (writers queue behind a waiting lock)."""
    import psycopg2
    from psycopg2 import sql

    try:
        cursor.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(
            sql.SQL(", ").join(sql.Identifier(schema, table) for table in tables)))
    except psycopg2.errors.LockNotAvailable:
        raise CutoverDeferred(f"{schema}'s tables could not be locked within {LOCK_TIMEOUT_MS} ms "
                              "(a long transaction holds them?)") from None


def _applied_lsn(cursor, subscription: str):
    """What the subscription's apply worker has applied and reported, or None when no
    worker runs."""
    cursor.execute("SELECT pid, latest_end_lsn FROM pg_stat_subscription WHERE subname = %s AND relid IS NULL",
                   (subscription,))
    row = cursor.fetchone()
    return row[1] if row and row[0] else None


def flushed_position(cursor) -> str:
    """A position in the source's WAL up to which its walsender can decode and report now: the
    end of a logical message (which no subscription receives) committed in a transaction of its
    own, whose commit flushes the WAL through it. `cursor` is on an autocommit connection to
    the source's primary, not the one holding the shard's lock.

    The current WAL position would not do: it can be a page boundary inside a record that an
    open transaction is writing. The WAL writer flushes whole pages only, a walsender decodes
    whole flushed records only, and on an idle source nothing flushes the rest of that record
    until that transaction ends (the lock's own, which waits on the position, or another
    one): the wait can never end (seen after a checkpoint, when the lock's catalog reads
    write full-page images for hint bits)."""
    import psycopg2

    cursor.execute("BEGIN")
    try:
        # A commit that waited on a synchronous standby would hold the shard's writes longer,
        # or for ever with that standby down; this one only has to reach the local disk.
        cursor.execute("SET LOCAL synchronous_commit = local")
        cursor.execute("SELECT pg_logical_emit_message(true, 'igops-shard-move', 'position')")
        position = cursor.fetchone()[0]
        cursor.execute("COMMIT")
    except psycopg2.Error:
        # The connection goes on being used: leave no failed transaction open on it.
        if not cursor.connection.closed:
            try:
                cursor.execute("ROLLBACK")
            except psycopg2.Error:
                pass
        raise
    return position


def wait_applied(cursor, subscription: str, source_cursor, budget_s: float) -> str:
    """Until the subscription has applied the source's WAL up to a position past everything
    committed before now (see `flushed_position`, which `source_cursor` writes); returns that
    position. Its apply worker reports a position only after applying everything before it."""
    lsn = flushed_position(source_cursor)
    deadline = time.monotonic() + budget_s
    while True:
        cursor.execute("SELECT latest_end_lsn >= %s::pg_lsn FROM pg_stat_subscription "
                       "WHERE subname = %s AND relid IS NULL AND pid IS NOT NULL", (lsn, subscription))
        row = cursor.fetchone()
        if row and row[0]:
            return lsn
        if time.monotonic() > deadline:
            raise CutoverDeferred(f"the target did not apply the source's WAL up to {lsn} within "
                                 f"{budget_s * 1000:.0f} ms")
        time.sleep(0.002)


class CutoverDeferred(IgopsError):
    """Writes were held but the moment was not right: they are released and it is tried again."""


# --- the journal ------------------------------------------------------------------------------
STEPS = ("planned", "target_ready", "published", "copied", "subscribed", "caught_up", "verified", "switched",
         "cleaned")
# Where `--pause-after` may stop a move: after each journaled step, and inside the cut-over
# after the lock is taken and after the source is fenced (before the map flips).
PAUSE_POINTS = ("planned", "target_ready", "published", "copied", "subscribed", "caught_up", "verified",
                "locked", "fenced", "switched")
ACTIVE, DONE, ABORTED = "active", "done", "aborted"

JOURNAL_DDL = """
CREATE TABLE IF NOT EXISTS shard_moves (
    id bigserial PRIMARY KEY,
    logical_shard integer NOT NULL,
    schema_name text NOT NULL,
    source text NOT NULL,
    target text NOT NULL,
    step text NOT NULL,
    status text NOT NULL CHECK (status IN ('active', 'done', 'aborted')),
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    started_by text NOT NULL,
    source_lsn pg_lsn,
    source_sequence bigint,
    target_sequence bigint,
    map_version bigint,
    rows_copied bigint,
    bytes_copied bigint,
    verify_pause_ms double precision,
    lock_wait_ms double precision,
    write_block_ms double precision,
    error text,
    history jsonb NOT NULL DEFAULT '[]'
);
CREATE UNIQUE INDEX IF NOT EXISTS shard_moves_one_active ON shard_moves (logical_shard) WHERE status = 'active';
"""
# A session-level advisory lock per shard on the journal's connection: held by the process
# driving a move, and released by the server the moment that process dies.
ADVISORY_CLASS = 0x69676D76  # "igmv"

_RECORD_FIELDS = ("id", "logical_shard", "schema_name", "source", "target", "step", "status", "started_at",
                  "updated_at", "finished_at", "started_by", "source_lsn", "source_sequence", "target_sequence",
                  "map_version", "rows_copied", "bytes_copied", "verify_pause_ms", "lock_wait_ms",
                  "write_block_ms", "error", "history")


@dataclass
class MoveRecord:
    id: int
    logical_shard: int
    schema_name: str
    source: str
    target: str
    step: str
    status: str
    started_at: str
    updated_at: str
    finished_at: str | None
    started_by: str
    source_lsn: str | None
    source_sequence: int | None
    target_sequence: int | None
    map_version: int | None
    rows_copied: int | None
    bytes_copied: int | None
    verify_pause_ms: float | None
    lock_wait_ms: float | None
    write_block_ms: float | None
    error: str | None
    history: list[dict]
    running: bool | None = None  # whether a process holds the shard's move lock now
    retained_wal_bytes: int | None = None
    state: str = field(init=False)  # running, interrupted, failed, done or aborted

    def __post_init__(self) -> None:
        if self.status != ACTIVE:
            self.state = self.status
        elif self.running:
            self.state = "running"
        else:
            self.state = "failed" if self.error else "interrupted"

    @property
    def slot(self) -> str:
        return f"igops_move_{self.id}"

    @property
    def fenced_schema(self) -> str:
        return f"{self.schema_name}_moved_{self.id}"


class Journal:
    """The `shard_moves` table in the directory database, through an autocommit connection."""

    def __init__(self, connection):
        self.connection = connection

    def exists(self) -> bool:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass('shard_moves') IS NOT NULL")
            return cursor.fetchone()[0]

    def ensure(self) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute(JOURNAL_DDL)

    def _select(self, where: str, params: tuple, limit: int | None = None) -> list[MoveRecord]:
        if not self.exists():
            return []
        with self.connection.cursor() as cursor:
            cursor.execute(f"SELECT {', '.join(_RECORD_FIELDS)} FROM shard_moves WHERE {where} ORDER BY id DESC"
                           + (f" LIMIT {int(limit)}" if limit else ""), params)
            rows = cursor.fetchall()
            cursor.execute("SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND granted",
                           (ADVISORY_CLASS,))
            locked = {row[0] for row in cursor.fetchall()}
        records = []
        for row in rows:
            values = dict(zip(_RECORD_FIELDS, row, strict=False))
            for key in ("started_at", "updated_at", "finished_at"):
                if values[key] is not None:
                    values[key] = values[key].isoformat(timespec="seconds")
            values["source_lsn"] = str(values["source_lsn"]) if values["source_lsn"] else None
            values["running"] = values["status"] == ACTIVE and values["logical_shard"] in locked
            records.append(MoveRecord(**values))
        return records

    def get(self, move_id: int) -> MoveRecord:
        found = self._select("id = %s", (move_id,))
        if not found:
            raise UsageError(f"no shard move {move_id} in the journal", "see `igops shard moves`")
        return found[0]

    def active_for(self, shard: int) -> MoveRecord | None:
        found = self._select("logical_shard = %s AND status = 'active'", (shard,))
        return found[0] if found else None

    def active(self) -> list[MoveRecord]:
        return self._select("status = 'active'", ())

    def recent(self, limit: int, shard: int | None = None) -> list[MoveRecord]:
        if shard is None:
            return self._select("true", (), limit)
        return self._select("logical_shard = %s", (shard,), limit)

    def create(self, plan: MovePlan) -> MoveRecord:
        from psycopg2 import errors

        self.ensure()
        try:
            with self.connection.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO shard_moves (logical_shard, schema_name, source, target, step, status, started_by, "
                    "history) VALUES (%s, %s, %s, %s, 'planned', 'active', %s, "
                    "jsonb_build_array(jsonb_build_object('step', 'planned', 'at', now()))) RETURNING id",
                    (plan.shard, plan.schema, plan.source, plan.target, operator_label()))
                move_id = cursor.fetchone()[0]
        except errors.UniqueViolation:
            other = self.active_for(plan.shard)
            raise RefusedError(f"shard {plan.shard} already has an unfinished move"
                               + (f" ({other.id}, at {other.step})" if other else ""),
                               "finish it with --resume or roll it back with --abort") from None
        return self.get(move_id)

    def advance(self, move_id: int, step: str, **fields: Any) -> None:
        self.update(move_id, step=step, **fields)

    def update(self, move_id: int, step: str | None = None, **fields: Any) -> None:
        from psycopg2 import sql

        assignments = [sql.SQL("updated_at = now()")]
        params: list[Any] = []
        if step is not None:
            assignments.append(sql.SQL("step = %s, history = history || "
                                       "jsonb_build_array(jsonb_build_object('step', %s, 'at', now()))"))
            params += [step, step]
            fields.setdefault("error", None)
        for name, value in fields.items():
            assignments.append(sql.SQL("{} = %s").format(sql.Identifier(name)))
            params.append(value)
        with self.connection.cursor() as cursor:
            cursor.execute(sql.SQL("UPDATE shard_moves SET {} WHERE id = %s").format(sql.SQL(", ").join(assignments)),
                           [*params, move_id])

    def fail(self, move_id: int, error: str) -> None:
        self.update(move_id, error=error[:2000])

    def finish(self, move_id: int, status: str, step: str | None = None, error: str | None = None) -> None:
        self.update(move_id, step=step, status=status, finished_at=datetime.now(UTC), error=error)

    def hold_shard(self, shard: int) -> None:
        """Take the shard's move lock for the life of this connection, or say who has it."""
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", (ADVISORY_CLASS, shard))
            if cursor.fetchone()[0]:
                return
            cursor.execute("SELECT a.client_addr, a.pid, a.backend_start FROM pg_locks l "
                           "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                           "AND l.classid = %s AND l.objid = %s AND l.granted", (ADVISORY_CLASS, shard))
            holder = cursor.fetchone()
        raise AlreadyRunning(f"a move of shard {shard} is running"
                             + (f" (from {holder[0]}, session since {holder[2]:%H:%M:%S})" if holder else ""),
                             "wait for it; the lock is released when that igops exits")


def operator_label() -> str:
    return f"{operator_user()}@{operator_host()} pid {os.getpid()}"


# --- moves ------------------------------------------------------------------------------------
# The target's sequences start this far past the source's: half the 10-bit sequence space, so
# ids minted on either side around the cut-over differ in their low bits even if the two
# servers' clocks disagree by a few milliseconds.
SEQUENCE_MARGIN = 512
COPY_PARALLEL = 3  # tables copied (and indexed) at once
PIPE_BLOCK = 256 * 1024  # bytes of COPY data handed on at a time
CUTOVER_ATTEMPTS = 3
CUTOVER_CATCH_UP_S = 1.0  # the longest the cut-over waits, writes held, for the last changes
MAX_CLOCK_SKEW_MS = 500
# How long the cleanup waits for the target to report having flushed the shard's last changes
# (the subscriber reports within a WAL writer cycle or two).
FLUSH_WAIT_S = 60


@dataclass(frozen=True)
class TableSize:
    name: str
    rows: int
    bytes: int


@dataclass
class MovePlan:
    shard: int
    schema: str
    source: str
    target: str
    source_primary: str
    target_primary: str
    database: str
    tables: list[TableSize]
    max_lag_bytes: int
    move_id: int | None = None
    resume_after: str | None = None  # the last step a resumed move had completed

    @property
    def slot(self) -> str:
        return f"igops_move_{self.move_id if self.move_id is not None else '<id>'}"

    @property
    def fenced_schema(self) -> str:
        return f"{self.schema}_moved_{self.move_id if self.move_id is not None else '<id>'}"

    def remaining(self) -> list[str]:
        start = STEPS.index(self.resume_after) + 1 if self.resume_after else 0
        return list(STEPS[start:])

    def steps(self) -> list[str]:
        return [describe_step(self, step) for step in self.remaining()]


def describe_step(plan: MovePlan, step: str) -> str:
    rows = sum(table.rows for table in plan.tables)
    size = sum(table.bytes for table in plan.tables)
    src = f"{plan.source} ({plan.source_primary})"
    dst = f"{plan.target} ({plan.target_primary})"
    return {
        "planned": f"journal the move of shard {plan.shard} ({plan.schema}) from {plan.source} to {plan.target} "
                   "in the directory's shard_moves",
        "target_ready": f"on {dst}: create schema {plan.schema} from the shard DDL (tables, sequence, next_id()) "
                        f"and check it matches {plan.source}'s",
        "published": f"on {src}: publication {plan.slot} FOR TABLES IN SCHEMA {plan.schema}",
        "copied": f"on {src}: logical replication slot {plan.slot} exporting its snapshot; COPY {len(plan.tables)} "
                  f"tables (~{rows:,} rows, {human_bytes(size)}) under that snapshot into {dst}, "
                  f"{COPY_PARALLEL} at a time, then build their keys and indexes",
        "subscribed": f"on {dst}: subscription {plan.slot} streaming from the slot (no copy of its own)",
        "caught_up": f"wait until {plan.target} is within {human_bytes(plan.max_lag_bytes)} of {plan.source}'s WAL",
        "verified": f"on {src}: temporary slot {plan.slot}_changes to track the keys written from now on; pause "
                    f"writes to {plan.schema} for an instant to snapshot both copies at one point, then "
                    "compare per-table row counts and row hashes (a mismatch is located by ordered md5 chunks), "
                    "sequences and the schema",
        "switched": f"cut over: LOCK {plan.schema}'s tables IN EXCLUSIVE MODE on {plan.source} (writes wait, reads "
                    f"go on); final catch-up; the rows written since the verification equal on both; "
                    f"{plan.schema} sequences on {plan.target} set {SEQUENCE_MARGIN} past {plan.source}'s; rename "
                    f"{plan.schema} to {plan.fenced_schema} on {plan.source} (waiting writers fail and retry); "
                    f"commit; shard map: shard {plan.shard} -> {plan.target}, version + 1",
        "cleaned": f"once {plan.target} has flushed the shard's last changes (the slot's confirmed_flush_lsn), "
                   f"drop subscription, slot and publication {plan.slot} and the old copy {plan.fenced_schema} "
                   f"on {plan.source}",
    }[step]


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


def resume_point(step: str) -> str:
    """The last step a resumed move takes as done. The rows written since a verification are
    known only to the igops that verified (its temporary slot went with it): a move stopped
    after its verification, or during its cut-over, verifies again."""
    return "caught_up" if step == "verified" else step


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


@dataclass
class AbortPlan:
    move_id: int
    shard: int
    schema: str
    source: str
    target: str
    step: str
    slot: str
    fenced_schema: str

    def steps(self) -> list[str]:
        return [
            f"on {self.target}: drop subscription {self.slot} and the partial copy {self.schema}",
            f"on {self.source}: if the cut-over fenced it, rename {self.fenced_schema} back to {self.schema}; "
            f"drop slot and publication {self.slot}",
            f"journal: move {self.move_id} aborted (the shard map still places shard {self.shard} on {self.source})",
        ]


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
