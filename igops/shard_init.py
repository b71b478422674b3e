"""`igops shard init`: the directory database and every logical shard's schema, created from the
service's own DDL. Idempotent, and it never moves anything: an existing shard map is kept as it
is, and only the schemas it names are created where it says."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from igops.errors import IgopsError
from igops.output import Reporter, plural
from igops.postgres_admin import primary_connection
from igops.shard_ids import shard_ranges
from igops.shard_map import cluster_names, schema_name
from igops.shard_schema import act_as_owner, read_ddl, shard_ddl

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

    from igops.inventory import Fleet


@dataclass
class ShardInitReport:
    directory: str  # "<cluster>/<database>"
    map_version: int
    map_created: bool
    shards_by_cluster: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class InitPlan:
    directory: str
    count: int
    missing_databases: list[str]
    map_version: int | None  # None: no map yet, one will be seeded
    placement: dict[int, str]
    missing_schemas: dict[str, list[int]]

    def steps(self) -> list[str]:
        steps = [f"create database {name}" for name in self.missing_databases]
        steps.append(f"apply the directory DDL in {self.directory} (idempotent)")
        by_cluster: dict[str, list[int]] = {}
        for shard, cluster in sorted(self.placement.items()):
            by_cluster.setdefault(cluster, []).append(shard)
        layout = "; ".join(f"{cluster}: {shard_ranges(shards)}" for cluster, shards in by_cluster.items())
        if self.map_version is None:
            steps.append(f"seed the shard map with {plural(self.count, 'shard')} ({layout}) as version 1")
        else:
            steps.append(
                f"keep the shard map (version {self.map_version}, {plural(len(self.placement), 'shard')}: {layout})"
            )
        for cluster, shards in by_cluster.items():
            missing = self.missing_schemas.get(cluster, [])
            steps.append(
                f"on {cluster}: apply the shard DDL to {plural(len(shards), 'schema')} (tables, next_id()); "
                + (f"new: {shard_ranges(missing)}" if missing else "all exist")
            )
        return steps


def even_placement(clusters: list[str], count: int) -> dict[int, str]:
    """Contiguous, even ranges: shard ids are spread over clusters in order."""
    return {shard: clusters[shard * len(clusters) // count] for shard in range(count)}


def plan_init(fleet: Fleet, count: int | None = None) -> InitPlan:
    """What `init_shards` would do, read without changing anything."""
    model = fleet.model
    count = count or model.shards.count
    clusters = cluster_names(fleet)
    directory_cluster = fleet.directory_cluster
    assert directory_cluster is not None  # the first cluster when [shards] names none; cluster_names found some
    missing_databases: list[str] = []
    present: dict[str, set[str]] = {}
    for name in clusters:
        wanted = [model.postgres.database] + ([model.shards.directory_database] if name == directory_cluster else [])
        with primary_connection(fleet, name, "postgres", autocommit=True, purpose="shards") as connection:
            with connection.cursor() as cursor:
                cursor.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (wanted,))
                found = {row[0] for row in cursor.fetchall()}
        missing_databases += [f"{name}/{database}" for database in wanted if database not in found]
        if model.postgres.database in found:
            with primary_connection(
                fleet, name, model.postgres.database, autocommit=True, purpose="shards"
            ) as connection:
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (model.shards.schema_prefix + "%",)
                    )
                    present[name] = {row[0] for row in cursor.fetchall()}
    placement, version = {}, None
    if f"{directory_cluster}/{model.shards.directory_database}" not in missing_databases:
        with primary_connection(
            fleet, directory_cluster, model.shards.directory_database, autocommit=True, purpose="shards"
        ) as connection:
            with connection.cursor() as cursor:
                cursor.execute("SELECT to_regclass('shard_map') IS NOT NULL")
                exists = cursor.fetchone()
                assert exists is not None  # a SELECT without FROM returns one row
                if exists[0]:
                    cursor.execute("SELECT logical_shard, cluster FROM shard_map")
                    placement = dict(cursor.fetchall())
                    cursor.execute("SELECT version FROM shard_map_version")
                    row = cursor.fetchone()
                    version = row[0] if placement and row else None
    if placement and set(placement) != set(range(count)):
        raise IgopsError(
            f"the shard map has {plural(len(placement), 'shard')}, {count} were asked for",
            "pass the map's shard count or fix the directory's shard_map",
        )
    placement = placement or even_placement(clusters, count)
    missing_schemas = {
        cluster: [
            shard
            for shard, where in sorted(placement.items())
            if where == cluster and schema_name(fleet, shard) not in present.get(cluster, set())
        ]
        for cluster in clusters
    }
    return InitPlan(
        f"{directory_cluster}/{model.shards.directory_database}",
        count,
        missing_databases,
        version,
        placement,
        missing_schemas,
    )


def init_shards(fleet: Fleet, reporter: Reporter | None = None, count: int | None = None) -> ShardInitReport:
    """Create the directory database's tables and seed them (clusters, an even contiguous
    shard map, the Redis master endpoint) when empty, then every logical shard's schema on
    the cluster the map assigns it to."""
    reporter = reporter or Reporter()
    model = fleet.model
    shards = model.shards
    clusters = cluster_names(fleet)
    directory_cluster = fleet.directory_cluster
    assert directory_cluster is not None  # the first cluster when [shards] names none; cluster_names found some
    ddl = {key: read_ddl(fleet, key) for key in ("directory_ddl", "shard_ddl")}

    with reporter.step("create missing databases") as step:
        created = []
        for name in clusters:
            wanted = [model.postgres.database] + ([shards.directory_database] if name == directory_cluster else [])
            with primary_connection(fleet, name, "postgres", purpose="shards") as connection:
                created += [f"{name}/{database}" for database in wanted if _create_database(connection, database)]
        step.detail = ", ".join(created) or "all present"

    with reporter.step(f"directory on {directory_cluster}/{shards.directory_database}") as step:
        with primary_connection(fleet, directory_cluster, shards.directory_database, purpose="shards") as connection:
            map_created, version, placement = _seed_directory(
                connection, fleet, ddl["directory_ddl"], count or shards.count
            )
        step.detail = f"shard map version {version}" + (" (new)" if map_created else "")

    report = ShardInitReport(f"{directory_cluster}/{shards.directory_database}", version, map_created)
    with reporter.step(f"{len(placement)} shard schemas") as step:
        for name in clusters:
            assigned = sorted(shard for shard, cluster in placement.items() if cluster == name)
            report.shards_by_cluster[name] = assigned
            if not assigned:
                continue
            with primary_connection(fleet, name, model.postgres.database, purpose="shards") as connection:
                with connection.cursor() as cursor:
                    act_as_owner(cursor)
                    for shard in assigned:
                        cursor.execute(shard_ddl(ddl["shard_ddl"], schema_name(fleet, shard), shard))
                connection.commit()
        step.detail = "; ".join(f"{name}: {len(ids)}" for name, ids in report.shards_by_cluster.items())
    return report


def _create_database(connection: Connection, database: str) -> bool:
    from psycopg2 import sql

    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if cursor.fetchone():
            return False
        cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    return True


def _seed_directory(
    connection: Connection, fleet: Fleet, directory_ddl: str, count: int
) -> tuple[bool, int, dict[int, str]]:
    model = fleet.model
    clusters = list(model.postgres.clusters)
    with connection.cursor() as cursor:
        act_as_owner(cursor)
        cursor.execute(directory_ddl)
        for name, cluster in model.postgres.clusters.items():
            cursor.execute(
                "INSERT INTO clusters (name, pgbouncer_database) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (name, cluster.pgbouncer_database or name),
            )
        # Serialise concurrent initialisations: only one may seed the map.
        cursor.execute("LOCK TABLE shard_map IN EXCLUSIVE MODE")
        cursor.execute("SELECT logical_shard, cluster FROM shard_map")
        placement = dict(cursor.fetchall())
        map_created = not placement
        if map_created:
            placement = even_placement(clusters, count)
            cursor.executemany(
                "INSERT INTO shard_map (logical_shard, cluster) VALUES (%s, %s)", sorted(placement.items())
            )
            cursor.execute("UPDATE shard_map_version SET version = version + 1, updated_at = now()")
        elif set(placement) != set(range(count)):
            raise IgopsError(
                f"the shard map has {plural(len(placement), 'shard')}, {count} were asked for",
                "fix [shards] count (or --count) or the directory's shard_map",
            )
        if model.redis.master:
            master = fleet.host(model.redis.master)
            cursor.execute(
                "INSERT INTO endpoints (name, address) VALUES ('redis_master', %s) ON CONFLICT (name) DO NOTHING",
                (f"{master.address}:{model.redis.port}",),
            )
        cursor.execute("SELECT version FROM shard_map_version")
        row = cursor.fetchone()
        if row is None:
            raise IgopsError("the directory DDL seeds no shard map version", "fix [shards] directory_ddl")
        version: int = row[0]
    connection.commit()
    unknown = sorted({cluster for cluster in placement.values()} - set(clusters))
    if unknown:
        raise IgopsError(
            f"the shard map places shards on clusters the inventory lacks: {', '.join(unknown)}",
            "add them under [postgres.clusters] or fix the map",
        )
    return map_created, version, placement
