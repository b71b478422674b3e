"""Logical shards: schemas on the physical Postgres clusters, placed by the directory.

`init_shards` creates a fleet's directory and shard schemas from the service's own DDL. It is
idempotent and never moves anything: an existing shard map is kept as it is (shard moves
change it), and only the schemas it names are created where it says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from igops.errors import IgopsError, UsageError
from igops.output import Reporter


@dataclass
class ShardInitReport:
    directory: str  # "<cluster>/<database>"
    map_version: int
    map_created: bool
    shards_by_cluster: dict[str, list[int]] = field(default_factory=dict)


def init_shards(fleet, reporter: Reporter | None = None) -> ShardInitReport:
    """Create the directory database's tables and seed them (clusters, an even contiguous
    shard map, the Redis master endpoint) when empty, then every logical shard's schema on
    the cluster the map assigns it to."""
    reporter = reporter or Reporter()
    model = fleet.model
    shards = model.shards
    if not model.postgres.clusters:
        raise UsageError("the inventory defines no Postgres clusters", "add [postgres.clusters.*] entries")
    clusters = list(model.postgres.clusters)
    directory_cluster = shards.directory_cluster or clusters[0]
    ddl = {}
    for key in ("directory_ddl", "shard_ddl"):
        configured = getattr(shards, key)
        if not configured:
            raise UsageError(f"[shards] {key} is not set", "point it at the service's SQL file")
        try:
            ddl[key] = fleet.resolve(configured).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read [shards] {key} {configured}: {exc.strerror or exc}",
                             "fix the path in the inventory") from None

    with reporter.step("create missing databases") as step:
        created = []
        for name in clusters:
            wanted = [model.postgres.database] + ([shards.directory_database] if name == directory_cluster else [])
            with _connect(fleet, name, "postgres") as connection:
                created += [f"{name}/{database}" for database in wanted if _create_database(connection, database)]
        step.detail = ", ".join(created) or "all present"

    with reporter.step(f"directory on {directory_cluster}/{shards.directory_database}") as step:
        with _connect(fleet, directory_cluster, shards.directory_database) as connection:
            map_created, version, placement = _seed_directory(connection, fleet, ddl["directory_ddl"])
        step.detail = f"shard map version {version}" + (" (new)" if map_created else "")

    report = ShardInitReport(f"{directory_cluster}/{shards.directory_database}", version, map_created)
    with reporter.step(f"{shards.count} shard schemas") as step:
        for name in clusters:
            assigned = sorted(shard for shard, cluster in placement.items() if cluster == name)
            report.shards_by_cluster[name] = assigned
            if not assigned:
                continue
            with _connect(fleet, name, model.postgres.database) as connection:
                with connection.cursor() as cursor:
                    _act_as_owner(cursor)
                    for shard in assigned:
                        cursor.execute(ddl["shard_ddl"].format(schema=f"{shards.schema_prefix}{shard}",
                                                               shard_id=shard))
                connection.commit()
        step.detail = "; ".join(f"{name}: {len(ids)}" for name, ids in report.shards_by_cluster.items())
    return report


class _connect:
    """A connection to a cluster's primary, closed on exit (psycopg2's own context manager
    only ends the transaction)."""

    def __init__(self, fleet, cluster: str, database: str):
        self.fleet, self.cluster, self.database = fleet, cluster, database

    def __enter__(self):
        import psycopg2

        from igops.secrets import Secrets

        model = self.fleet.model
        primary = self.fleet.host(model.postgres.clusters[self.cluster].primary)
        try:
            self.connection = psycopg2.connect(
                host=str(primary.address), port=model.postgres.port, user=model.postgres.user,
                password=Secrets(model.secrets.file).get("postgres_password"), dbname=self.database,
                connect_timeout=5, application_name="igops-shards")
        except psycopg2.OperationalError as exc:
            raise IgopsError(f"cannot connect to {self.database} on {primary.name} (primary of {self.cluster}): "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}",
                             "check that the primary is up (igops status)") from None
        return self.connection

    def __exit__(self, *exc_info):
        self.connection.close()


def _create_database(connection, database: str) -> bool:
    from psycopg2 import sql

    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if cursor.fetchone():
            return False
        cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    return True


def _act_as_owner(cursor) -> None:
    """Create objects as the database's owner, so the service that owns the database owns
    its tables too."""
    from psycopg2 import sql

    cursor.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
    cursor.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(cursor.fetchone()[0])))


def _seed_directory(connection, fleet, directory_ddl: str) -> tuple[bool, int, dict[int, str]]:
    model = fleet.model
    count = model.shards.count
    clusters = list(model.postgres.clusters)
    with connection.cursor() as cursor:
        _act_as_owner(cursor)
        cursor.execute(directory_ddl)
        for name, cluster in model.postgres.clusters.items():
            cursor.execute("INSERT INTO clusters (name, pgbouncer_database) VALUES (%s, %s) "
                           "ON CONFLICT (name) DO NOTHING", (name, cluster.pgbouncer_database or name))
        # Serialise concurrent initialisations: only one may seed the map.
        cursor.execute("LOCK TABLE shard_map IN EXCLUSIVE MODE")
        cursor.execute("SELECT logical_shard, cluster FROM shard_map")
        placement = dict(cursor.fetchall())
        map_created = not placement
        if map_created:
            placement = {shard: clusters[shard * len(clusters) // count] for shard in range(count)}
            cursor.executemany("INSERT INTO shard_map (logical_shard, cluster) VALUES (%s, %s)",
                               sorted(placement.items()))
            cursor.execute("UPDATE shard_map_version SET version = version + 1, updated_at = now()")
        elif set(placement) != set(range(count)):
            raise IgopsError(f"the shard map has {len(placement)} shards, the inventory says {count}",
                             "fix [shards] count or the directory's shard_map")
        if model.redis.master:
            master = fleet.host(model.redis.master)
            cursor.execute("INSERT INTO endpoints (name, address) VALUES ('redis_master', %s) "
                           "ON CONFLICT (name) DO NOTHING", (f"{master.address}:{model.redis.port}",))
        cursor.execute("SELECT version FROM shard_map_version")
        version = cursor.fetchone()[0]
    connection.commit()
    unknown = sorted({cluster for cluster in placement.values()} - set(clusters))
    if unknown:
        raise IgopsError(f"the shard map places shards on clusters the inventory lacks: {', '.join(unknown)}",
                         "add them under [postgres.clusters] or fix the map")
    return map_created, version, placement
