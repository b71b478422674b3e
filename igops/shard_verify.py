"""Two copies of a shard compared table by table: row counts and ordered md5 checksums by
key-range chunks (or, while a move waits on it, a cheaper order-free row hash), sequences and
the schema; or one copy against what the service's shard DDL creates. While a move replicates
between two copies, both are read at one point of the stream (writes pause for an instant)."""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError, UsageError, first_line
from igops.output import Reporter
from igops.postgres_admin import connect, primary_connection, primary_of
from igops.postgres_deadline import Watchdog
from igops.shard_journal import Journal
from igops.shard_locks import CUTOVER_DEADLINE, HOLD_LIMIT_S, LOCK_SETTINGS, lock_tables, wait_applied
from igops.shard_map import check_shard, directory_session, placement_of, schema_name
from igops.shard_move_steps import STEPS
from igops.shard_schema import (
    SchemaShape,
    TableShape,
    describe_schema,
    read_ddl,
    schema_diff,
    sequence_values,
    shard_ddl,
    tables_of,
)

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection, cursor as Cursor

    from igops.inventory import Fleet

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


def _digest_table(cursor: Cursor, schema: str, shape: TableShape, bounds: list[Any]) -> tuple[int, str, list[str]]:
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
        query = sql.SQL(
            "SELECT count(*), coalesce(md5(string_agg(r::text, '|')), '') "
            "FROM (SELECT t AS r FROM {table} AS t{where} ORDER BY {order}) AS ordered"
        ).format(
            order=order, table=table, where=sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL("")
        )
        cursor.execute(query, params)
        row = cursor.fetchone()
        assert row is not None  # an aggregate without GROUP BY returns one row
        rows, digest = row
        total += rows
        chunk_digests.append(digest)
    return total, hashlib.md5("|".join(chunk_digests).encode()).hexdigest(), chunk_digests


def _chunk_bounds(cursor: Cursor, schema: str, shape: TableShape) -> list[Any]:
    """Every CHUNK_ROWS-th value of the first key column: chunk edges both copies share."""
    from psycopg2 import sql

    cursor.execute(
        sql.SQL(
            "SELECT k FROM (SELECT {column} AS k, row_number() OVER (ORDER BY {column}) AS n "
            "FROM {table}) AS numbered WHERE n %% %s = 0"
        ).format(column=sql.Identifier(shape.primary_key[0]), table=sql.Identifier(schema, shape.name)),
        (CHUNK_ROWS,),
    )
    return sorted({row[0] for row in cursor.fetchall()})


def _hash_table(cursor: Cursor, schema: str, shape: TableShape) -> tuple[int, str]:
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
    row = cursor.fetchone()
    assert row is not None  # an aggregate without GROUP BY returns one row
    rows, digest = row
    cursor.execute("RELEASE SAVEPOINT igops_row_hash")
    return rows, f"{digest & (2**64 - 1):016x}"


def compare_snapshots(
    shard: int,
    copies: tuple[ShardCopy, ShardCopy],
    cursors: tuple[Any, Any],
    consistent: bool,
    pause_ms: float | None,
    ordered: bool = True,
) -> VerifyReport:
    """Compare two copies through cursors whose transactions already hold the snapshots to
    read (REPEATABLE READ), each copy's work in its own thread. Ordered: md5 of the rows in
    key order, by key-range chunks. Otherwise an order-free row hash per table, and the
    ordered chunks only for a table whose hashes differ, to name where."""
    found = [describe_schema(cursor, copy.schema) for cursor, copy in zip(cursors, copies, strict=False)]
    shapes: list[SchemaShape] = []
    for shape, copy in zip(found, copies, strict=False):
        if shape is None:
            raise IgopsError(f"{copy.label} does not exist", "check the shard and the cluster")
        shapes.append(shape)
    left, right = copies
    diff = (
        schema_diff(shapes[0], shapes[1], left.cluster, right.cluster)
        if left.cluster != right.cluster
        else schema_diff(shapes[0], shapes[1], left.label, right.label)
    )
    comparable = [
        name
        for name in sorted(shapes[0].tables)
        if name in shapes[1].tables
        and shapes[0].tables[name].primary_key
        and shapes[0].tables[name].primary_key == shapes[1].tables[name].primary_key
        and shapes[0].tables[name].columns == shapes[1].tables[name].columns
    ]

    def on_both(
        digest: Callable[[int, str], tuple[int, str, list[str]]], names: list[str]
    ) -> list[dict[str, tuple[int, str, list[str]]]]:
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
            chunk = next((i for i, (a, b) in enumerate(zip(chunks_a, chunks_b, strict=False)) if a != b), None)
            if chunk is not None:
                low, high = edges[chunk], edges[chunk + 1]
                difference = (
                    f"{shapes[0].tables[name].primary_key[0]} in "
                    f"[{'-inf' if low is None else low}, {'+inf' if high is None else high})"
                )
        tables.append(
            TableCheck(
                name,
                {left.label: rows_a, right.label: rows_b},
                {left.label: sum_a, right.label: sum_b},
                sum_a == sum_b,
                difference,
            )
        )
    sequences = {
        copy.label: sequence_values(cursor, copy.schema, shape.sequences)
        for cursor, copy, shape in zip(cursors, copies, shapes, strict=False)
    }
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


def verify_in_place(fleet: Fleet, shard: int) -> ShapeReport:
    """One copy: its per-table rows and checksums, sequences, and its difference from what
    the service's shard DDL creates (built in a transaction that is rolled back)."""
    check_shard(fleet, shard)
    placement = placement_of(fleet, shard)
    schema = schema_name(fleet, shard)
    copy = ShardCopy(placement, schema)
    template = read_ddl(fleet, "shard_ddl")
    with primary_connection(
        fleet,
        placement,
        fleet.model.postgres.database,
        purpose="shards",
        settings={"max_parallel_workers_per_gather": 0},
    ) as connection:
        connection.set_session(isolation_level="REPEATABLE READ")
        with connection.cursor() as cursor:
            shape = describe_schema(cursor, schema)
            if shape is None:
                raise IgopsError(
                    f"the map places shard {shard} on {placement}, which has no schema {schema}",
                    "check `igops shard moves` for an unfinished move",
                )
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
    if expected is None:
        raise IgopsError(
            f"the service's shard DDL created no schema {probe}", "its statements must create the schema {schema}"
        )
    diff = schema_diff(expected, shape, "the shard DDL", copy.label)
    diff += [
        f"table {name} has no primary key (logical replication cannot move it)"
        for name, table in sorted(shape.tables.items())
        if not table.primary_key
    ]
    return ShapeReport(shard, copy.label, checks, sequences, diff, not diff)


def verify_against(fleet: Fleet, shard: int, against: str, reporter: Reporter | None = None) -> VerifyReport:
    """The shard's copy where the map places it against the copy on another cluster. While a
    move replicates between them, both are read at one point of the stream (writes to the
    shard pause for an instant); otherwise each is read as it is."""
    reporter = reporter or Reporter()
    check_shard(fleet, shard)
    source = placement_of(fleet, shard)
    primary_of(fleet, against)
    if against == source:
        raise UsageError(
            f"shard {shard} is on {against}: there is no other copy to compare",
            "name the cluster holding the other copy",
        )
    schema = schema_name(fleet, shard)
    with directory_session(fleet) as directory:
        active = Journal(directory).active_for(shard)
    subscription = None
    if (
        active
        and active.target == against
        and active.source == source
        and STEPS.index(active.step) >= STEPS.index("subscribed")
    ):
        subscription = active.slot
    return verify_copies(fleet, shard, ShardCopy(source, schema), ShardCopy(against, schema), subscription, reporter)


def verify_copies(
    fleet: Fleet,
    shard: int,
    source: ShardCopy,
    target: ShardCopy,
    subscription: str | None,
    reporter: Reporter,
    wait_budget_s: float = 2.0,
    ordered: bool = True,
) -> VerifyReport:
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
            pause_ms = _matching_snapshots(
                fleet, source, target, subscription, source_reader, target_reader, wait_budget_s
            )
            reporter.log(f"snapshots taken; writes to {source.schema} paused {pause_ms:.0f} ms")
        with source_reader.cursor() as left, target_reader.cursor() as right:
            if not subscription:
                left.execute("SELECT 1")
                right.execute("SELECT 1")
            return compare_snapshots(
                shard, (source, target), (left, right), subscription is not None, pause_ms, ordered
            )
    finally:
        source_reader.close()
        target_reader.close()


def _matching_snapshots(
    fleet: Fleet,
    source: ShardCopy,
    target: ShardCopy,
    subscription: str,
    source_reader: Connection,
    target_reader: Connection,
    wait_budget_s: float,
) -> float:
    """Start the two readers' snapshots at one point of the replication stream: hold writes
    to the source's tables, wait until the target has applied everything before that point,
    snapshot both, let writes go. The write hold has the cut-over's deadlines: the connections
    that wait in it carry CUTOVER_DEADLINE, and a Watchdog cuts all three at HOLD_LIMIT_S (a
    server process that stopped running answers nothing and fires no timer), which ends the lock
    holder's transaction at once."""
    database = fleet.model.postgres.database
    locker = connect(fleet, source.cluster, database, autocommit=True, purpose="verify", settings=LOCK_SETTINGS)
    marker = connect(fleet, source.cluster, database, autocommit=True, purpose="verify", deadline=CUTOVER_DEADLINE)
    watcher = connect(fleet, target.cluster, database, autocommit=True, purpose="verify", deadline=CUTOVER_DEADLINE)
    try:
        with Watchdog(HOLD_LIMIT_S, [locker, marker, watcher]) as watchdog:
            try:
                return _snapshots_at_one_point(
                    locker, marker, watcher, source, subscription, source_reader, target_reader, wait_budget_s
                )
            except Exception as exc:  # a cut connection fails with psycopg2's error
                if not watchdog.cut_off(exc):
                    raise
                raise IgopsError(
                    f"a server stopped answering during the verification's write pause of {source.schema}: igops "
                    f"cut its connections after {HOLD_LIMIT_S:g} s ({first_line(exc)}), which released the writes",
                    "find the server that hung (`igops pg status`), then run the verification or the move again",
                ) from None
    finally:
        locker.close()
        marker.close()
        watcher.close()


def _snapshots_at_one_point(
    locker: Connection,
    marker: Connection,
    watcher: Connection,
    source: ShardCopy,
    subscription: str,
    source_reader: Connection,
    target_reader: Connection,
    wait_budget_s: float,
) -> float:
    """The write pause of `_matching_snapshots`; how long it held writes, in ms."""
    with locker.cursor() as cursor:
        tables = tables_of(cursor, source.schema)
    locker.autocommit = False
    locker.set_session(isolation_level="REPEATABLE READ")
    with (
        locker.cursor() as cursor,
        marker.cursor() as mark,
        watcher.cursor() as watch,
        source_reader.cursor() as left,
        target_reader.cursor() as right,
    ):
        started = time.monotonic()
        lock_tables(cursor, source.schema, tables)
        cursor.execute("SELECT pg_export_snapshot()")
        exported = cursor.fetchone()
        assert exported is not None  # a SELECT without FROM returns one row
        snapshot = exported[0]
        wait_applied(watch, subscription, mark, wait_budget_s)
        right.execute("SELECT 1")
        left.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
        locker.rollback()
        return (time.monotonic() - started) * 1000
