"""A worker's cached view of the directory database.

igops changes the shard map and the Redis master by editing the directory and
bumping a version; a worker checks the two versions at most once per TTL with
one cheap query and reloads only what changed, so a change is picked up within
about a second without restarts. Errors that suggest the cache is stale force
an immediate check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg2

from app.config import HostPort, parse_host_port
from app.db import Cursor, PgConnections
from app.errors import ServiceUnavailable
from app.shardmap import DirectorySnapshot, ShardMap

log = logging.getLogger(__name__)

REDIS_MASTER_ENDPOINT = "redis_master"
CACHE_TTL_SECONDS = 1.0

VERSIONS_QUERY = """
SELECT (SELECT version FROM shard_map_version WHERE singleton),
       (SELECT version FROM endpoints WHERE name = %s)
"""


def load_shard_map(cursor: Cursor, version: int | None) -> ShardMap:
    cursor.execute("SELECT name, pgbouncer_database FROM clusters")
    database_of_cluster = dict(cursor.fetchall())
    cursor.execute("SELECT logical_shard, cluster FROM shard_map")
    return ShardMap(version=version, cluster_of_shard=dict(cursor.fetchall()), database_of_cluster=database_of_cluster)


def load_redis_master(cursor: Cursor) -> tuple[HostPort | None, int | None]:
    cursor.execute("SELECT address, version FROM endpoints WHERE name = %s", (REDIS_MASTER_ENDPOINT,))
    row = cursor.fetchone()
    if row is None:
        return None, None
    address, version = row
    try:
        return parse_host_port(address), version
    except ValueError:
        log.error("directory endpoint %s has a malformed address %r", REDIS_MASTER_ENDPOINT, address)
        return None, version


def read_snapshot(cursor: Cursor, previous: DirectorySnapshot | None = None) -> DirectorySnapshot:
    cursor.execute(VERSIONS_QUERY, (REDIS_MASTER_ENDPOINT,))
    map_version, master_version = cursor.fetchone()
    if previous is not None and previous.shard_map.version == map_version and map_version is not None:
        shard_map = previous.shard_map
    else:
        shard_map = load_shard_map(cursor, map_version)
    if previous is not None and previous.redis_master_version == master_version and master_version is not None:
        redis_master = previous.redis_master
    else:
        redis_master, master_version = load_redis_master(cursor)
    return DirectorySnapshot(shard_map=shard_map, redis_master=redis_master, redis_master_version=master_version)


class Directory:
    def __init__(
        self,
        pg: PgConnections,
        database: str,
        ttl_seconds: float = CACHE_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.pg = pg
        self.database = database
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._snapshot: DirectorySnapshot | None = None
        self._checked_at = float("-inf")

    @property
    def cached(self) -> DirectorySnapshot | None:
        return self._snapshot

    def snapshot(self) -> DirectorySnapshot:
        if self._snapshot is None or self.clock() - self._checked_at >= self.ttl_seconds:
            self.refresh()
        assert self._snapshot is not None
        return self._snapshot

    def refresh(self) -> DirectorySnapshot:
        """Check the versions now. If the directory cannot be reached, keep
        serving the last good snapshot: a stale map beats no map."""
        self._checked_at = self.clock()
        try:
            with self.pg.transaction(self.database) as cursor:
                fresh = read_snapshot(cursor, self._snapshot)
        except psycopg2.Error as exc:
            if self._snapshot is None:
                raise ServiceUnavailable(f"directory database unavailable: {str(exc).strip()}") from exc
            log.warning(
                "directory unavailable, keeping shard map version %s: %s",
                self._snapshot.shard_map.version,
                str(exc).strip(),
            )
            return self._snapshot
        if self._snapshot is not None and fresh != self._snapshot:
            log.info(
                "directory changed: shard map version %s -> %s, redis master %s -> %s",
                self._snapshot.shard_map.version,
                fresh.shard_map.version,
                self._snapshot.redis_master,
                fresh.redis_master,
            )
        self._snapshot = fresh
        return fresh
