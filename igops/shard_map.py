"""The shard map: which cluster holds each logical shard, as the directory database says, and
each shard schema's bytes there; and what every part of shards names the same way (a shard's
schema, the fleet's clusters, the directory's connections)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError, UsageError
from igops.postgres_admin import connect, last_primary, primary_connection

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection, cursor as Cursor

    from igops.inventory import Fleet
    from igops.postgres_deadline import Deadline


def check_shard(fleet: Fleet, shard: int) -> None:
    """Refuse a logical shard number outside the inventory's [shards] count, naming the valid
    range, before anything connects."""
    count = fleet.model.shards.count
    if not 0 <= shard < count:
        raise UsageError(f"shard {shard} is out of range", f"shards are 0-{count - 1} ([shards] count = {count})")


def schema_name(fleet: Fleet, shard: int) -> str:
    return f"{fleet.model.shards.schema_prefix}{shard}"


def cluster_names(fleet: Fleet) -> list[str]:
    if not fleet.model.postgres.clusters:
        raise UsageError("the inventory defines no Postgres clusters", "add [postgres.clusters.*] entries")
    return list(fleet.model.postgres.clusters)


@dataclass
class ShardPlacement:
    shard: int
    schema: str
    cluster: str
    bytes: int | None  # None: the cluster could not be asked
    present: bool | None  # whether the schema exists where the map says


@dataclass
class ClusterLoad:
    cluster: str
    primary: str
    pgbouncer_database: str
    shards: list[int]
    bytes: int | None
    error: str | None = None


@dataclass
class ShardMap:
    version: int
    updated_at: str
    shards: list[ShardPlacement]
    clusters: list[ClusterLoad]

    def placement(self) -> dict[int, str]:
        return {item.shard: item.cluster for item in self.shards}

    def sizes(self) -> dict[int, int]:
        return {item.shard: item.bytes or 0 for item in self.shards}


def directory_connection(
    fleet: Fleet,
    autocommit: bool = True,
    purpose: str = "shards",
    settings: dict[str, Any] | None = None,
    deadline: Deadline | None = None,
) -> Connection:
    """A connection to the directory database on its cluster's live primary, that the caller
    closes: every reader and writer of the directory (shards, the Redis endpoint) comes here.
    `deadline`: see igops.postgres_deadline."""
    cluster_names(fleet)  # refuses an inventory without clusters
    directory_cluster = fleet.directory_cluster
    assert directory_cluster is not None  # the first cluster when [shards] names none
    connection: Connection = connect(
        fleet,
        directory_cluster,
        fleet.model.shards.directory_database,
        autocommit=autocommit,
        purpose=purpose,
        settings=settings,
        deadline=deadline,
    )
    return connection


def directory_session(fleet: Fleet) -> primary_connection:
    """An autocommit directory connection as a context manager that closes it."""
    cluster_names(fleet)  # refuses an inventory without clusters
    directory_cluster = fleet.directory_cluster
    assert directory_cluster is not None  # the first cluster when [shards] names none
    return primary_connection(
        fleet, directory_cluster, fleet.model.shards.directory_database, autocommit=True, purpose="shards"
    )


def read_placement(cursor: Cursor) -> tuple[int, datetime, dict[int, str], dict[str, str]]:
    cursor.execute("SELECT version, updated_at FROM shard_map_version")
    row = cursor.fetchone()
    if row is None:
        raise IgopsError("the directory has no shard map version", "run `igops shard init`")
    cursor.execute("SELECT logical_shard, cluster FROM shard_map ORDER BY logical_shard")
    placement = dict(cursor.fetchall())
    cursor.execute("SELECT name, pgbouncer_database FROM clusters")
    return row[0], row[1], placement, dict(cursor.fetchall())


def read_map(fleet: Fleet, sizes: bool = True) -> ShardMap:
    """The directory's map, and (with `sizes`) each shard schema's bytes on its cluster:
    a cluster that cannot be reached is reported, not fatal."""
    connection = directory_connection(fleet)
    try:
        with connection.cursor() as cursor:
            version, updated_at, placement, databases = read_placement(cursor)
    finally:
        connection.close()
    by_cluster: dict[str, list[int]] = {name: [] for name in fleet.model.postgres.clusters}
    for shard, cluster in placement.items():
        by_cluster.setdefault(cluster, []).append(shard)
    schema_bytes: dict[str, dict[str, int]] = {}
    errors: dict[str, str] = {}
    if sizes:

        def measure(cluster: str) -> None:
            try:
                schema_bytes[cluster] = _schema_sizes(
                    fleet, cluster, [schema_name(fleet, s) for s in by_cluster[cluster]]
                )
            except IgopsError as exc:
                errors[cluster] = exc.message

        with ThreadPoolExecutor(max_workers=max(1, len(by_cluster))) as pool:
            list(pool.map(measure, [name for name in by_cluster if name in fleet.model.postgres.clusters]))
    shards = []
    for shard, cluster in sorted(placement.items()):
        measured = schema_bytes.get(cluster)
        schema = schema_name(fleet, shard)
        shards.append(
            ShardPlacement(
                shard,
                schema,
                cluster,
                measured.get(schema) if measured is not None else None,
                (schema in measured) if measured is not None else None,
            )
        )
    clusters = []
    for name, members in by_cluster.items():
        known = name in fleet.model.postgres.clusters
        measured = schema_bytes.get(name)
        clusters.append(
            ClusterLoad(
                name,
                last_primary(fleet, name) if known else "?",
                databases.get(name, "?"),
                sorted(members),
                sum(measured.values()) if measured is not None else None,
                errors.get(name) or (None if known else "not in the inventory"),
            )
        )
    return ShardMap(version, updated_at.isoformat(timespec="seconds"), shards, clusters)


def _schema_sizes(fleet: Fleet, cluster: str, schemas: list[str]) -> dict[str, int]:
    """Bytes of every table (with its indexes and TOAST) per existing schema."""
    with primary_connection(
        fleet, cluster, fleet.model.postgres.database, autocommit=True, purpose="shards"
    ) as connection:
        with connection.cursor() as cursor:
            cursor.execute(
                """
                SELECT n.nspname, coalesce(sum(pg_total_relation_size(c.oid))
                                           FILTER (WHERE c.relkind IN ('r', 'p', 'm')), 0)::bigint
                  FROM pg_namespace n LEFT JOIN pg_class c ON c.relnamespace = n.oid
                 WHERE n.nspname = ANY(%s) GROUP BY n.nspname""",
                (schemas,),
            )
            return dict(cursor.fetchall())


def placement_of(fleet: Fleet, shard: int) -> str:
    with directory_session(fleet) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT cluster FROM shard_map WHERE logical_shard = %s", (shard,))
            row = cursor.fetchone()
            if row is None:
                cursor.execute("SELECT min(logical_shard), max(logical_shard) FROM shard_map")
                bounds = cursor.fetchone()
                assert bounds is not None  # an aggregate without GROUP BY returns one row
                low, high = bounds
                raise UsageError(
                    f"unknown logical shard {shard}",
                    f"the shard map has shards {low}-{high}" if low is not None else "run igops shard init",
                )
    cluster: str = row[0]
    return cluster
