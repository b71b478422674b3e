import contextlib

import psycopg2

from app.config import HostPort
from app.directory import Directory, read_snapshot


class FakeCursor:
    """Answers the directory queries from in-memory tables and counts them."""

    def __init__(self):
        self.map_version = 1
        self.master_version = 1
        self.master_address = "127.0.0.1:6379"
        self.clusters = [("a", "cluster_a"), ("b", "cluster_b")]
        self.shard_map = [(0, "a"), (1, "a"), (2, "b")]
        self.queries = []
        self._result = []

    def execute(self, query, params=None):
        self.queries.append(query)
        if "shard_map_version" in query:
            self._result = [(self.map_version, self.master_version)]
        elif "FROM clusters" in query:
            self._result = list(self.clusters)
        elif "FROM shard_map" in query:
            self._result = list(self.shard_map)
        elif "FROM endpoints" in query:
            self._result = [(self.master_address, self.master_version)] if self.master_address else []

    def fetchone(self):
        return self._result[0] if self._result else None

    def fetchall(self):
        return self._result


def test_first_read_loads_everything():
    cursor = FakeCursor()
    snapshot = read_snapshot(cursor)
    assert snapshot.shard_map.logical_shards == (0, 1, 2)
    assert snapshot.shard_map.database_for(2) == "cluster_b"
    assert snapshot.redis_master == HostPort("127.0.0.1", 6379)


def test_unchanged_versions_cost_one_query():
    cursor = FakeCursor()
    first = read_snapshot(cursor)
    cursor.queries.clear()
    again = read_snapshot(cursor, first)
    assert len(cursor.queries) == 1
    assert again.shard_map is first.shard_map


def test_map_version_bump_reloads_the_map_only():
    cursor = FakeCursor()
    first = read_snapshot(cursor)
    cursor.shard_map = [(0, "a"), (1, "b"), (2, "b")]
    cursor.map_version = 2
    cursor.queries.clear()
    moved = read_snapshot(cursor, first)
    assert moved.shard_map.database_for(1) == "cluster_b"
    assert not any("endpoints WHERE name = %s" in q and "address" in q for q in cursor.queries)


def test_endpoint_version_bump_repoints_redis():
    cursor = FakeCursor()
    first = read_snapshot(cursor)
    cursor.master_address = "127.0.0.1:6380"
    cursor.master_version = 2
    assert read_snapshot(cursor, first).redis_master == HostPort("127.0.0.1", 6380)


def test_missing_endpoint_row_leaves_master_unknown():
    cursor = FakeCursor()
    cursor.master_address = None
    cursor.master_version = None
    assert read_snapshot(cursor).redis_master is None


class FakeConnections:
    def __init__(self, cursor):
        self.cursor = cursor
        self.fail = False

    @contextlib.contextmanager
    def transaction(self, database):
        if self.fail:
            raise psycopg2.OperationalError("directory down")
        yield self.cursor


def test_directory_checks_versions_at_most_once_per_ttl_and_survives_outages():
    now = [0.0]
    cursor = FakeCursor()
    connections = FakeConnections(cursor)
    directory = Directory(connections, "directory", ttl_seconds=1.0, clock=lambda: now[0])
    directory.snapshot()
    cursor.queries.clear()
    now[0] = 0.5
    directory.snapshot()
    assert cursor.queries == []
    now[0] = 1.5
    cursor.map_version = 2
    cursor.shard_map = [(0, "b")]
    assert directory.snapshot().shard_map.logical_shards == (0,)
    connections.fail = True
    now[0] = 3.0
    # a stale map beats no map while the directory is unreachable
    assert directory.snapshot().shard_map.logical_shards == (0,)
