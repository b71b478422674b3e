"""The app's directory cache against the lab's real Postgres: the SQL in app/directory.py runs on
a scratch database made from app/sql/directory.sql on the directory cluster's primary, so a
query that the schema does not answer fails here (a cursor matching substrings never would).

The scratch database is the session's own and is dropped afterwards: the lab's `directory`
database, which the running app reads, is never touched."""

import os

import psycopg2
import pytest

from app.config import HostPort, PostgresConfig
from app.db import PgConnections, connect
from app.directory import REDIS_MASTER_ENDPOINT, Directory, read_snapshot
from igops.secrets import Secrets
from tests.conftest import ROOT
from tests.labtools import postgres

pytestmark = pytest.mark.lab

DDL = ROOT / "app" / "sql" / "directory.sql"


class CountingCursor:
    """A real cursor that remembers the statements it ran."""

    def __init__(self, cursor):
        self.cursor = cursor
        self.queries: list[str] = []

    def execute(self, query, params=None):
        self.queries.append(query)
        return self.cursor.execute(query, params)

    def fetchone(self):
        return self.cursor.fetchone()

    def fetchall(self):
        return self.cursor.fetchall()


def _primary(lab) -> str:
    cluster = lab.model.postgres.clusters[lab.model.shards.directory_cluster]
    for node in [cluster.primary, *cluster.standbys]:
        connection = postgres(lab, node)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_is_in_recovery()")
                if not cursor.fetchone()[0]:
                    return node
        finally:
            connection.close()
    raise AssertionError("the directory cluster has no primary")


@pytest.fixture(scope="module")
def scratch(lab, tmp_path_factory):
    node = _primary(lab)
    name = f"igops_test_directory_{os.getpid()}"
    admin = postgres(lab, node)
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        connection = postgres(lab, node, name)
        with connection.cursor() as cursor:
            cursor.execute(DDL.read_text())
        password = Secrets(lab.model.secrets.file).get("postgres_password")
        password_file = None
        if password:
            password_file = tmp_path_factory.mktemp("directory") / "password"
            password_file.write_text(password)
        config = PostgresConfig(
            host=str(lab.host(node).address),
            port=lab.model.postgres.port,
            user=lab.model.postgres.user,
            password_file=password_file,
            directory_database=name,
            connect_timeout=5,
        )
        yield {"connection": connection, "admin": admin, "name": name, "config": config}
        connection.close()
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture
def directory(scratch):
    """The scratch directory holding two clusters, three shards and a Redis master, fresh per test."""
    connection = scratch["connection"]
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE shard_map, clusters, endpoints")
        cursor.execute("UPDATE shard_map_version SET version = 1")
        cursor.execute("INSERT INTO clusters VALUES ('a', 'cluster_a'), ('b', 'cluster_b')")
        cursor.execute("INSERT INTO shard_map VALUES (0, 'a'), (1, 'a'), (2, 'b')")
        cursor.execute(
            "INSERT INTO endpoints (name, address, version) VALUES (%s, '127.0.0.1:6379', 1)", (REDIS_MASTER_ENDPOINT,)
        )
    return scratch


def execute(scratch, sql: str, params=None) -> None:
    with scratch["connection"].cursor() as cursor:
        cursor.execute(sql, params)


def reader(scratch) -> CountingCursor:
    return CountingCursor(scratch["connection"].cursor())


def test_first_read_loads_everything(directory):
    snapshot = read_snapshot(reader(directory))
    assert snapshot.shard_map.logical_shards == (0, 1, 2)
    assert snapshot.shard_map.database_for(2) == "cluster_b"
    assert snapshot.redis_master == HostPort("127.0.0.1", 6379)


def test_unchanged_versions_cost_one_query(directory):
    cursor = reader(directory)
    first = read_snapshot(cursor)
    cursor.queries.clear()
    again = read_snapshot(cursor, first)
    assert len(cursor.queries) == 1
    assert again.shard_map is first.shard_map


def test_map_version_bump_reloads_the_map_only(directory):
    cursor = reader(directory)
    first = read_snapshot(cursor)
    execute(directory, "UPDATE shard_map SET cluster = 'b' WHERE logical_shard = 1")
    execute(directory, "UPDATE shard_map_version SET version = version + 1")
    cursor.queries.clear()
    moved = read_snapshot(cursor, first)
    assert moved.shard_map.database_for(1) == "cluster_b"
    assert moved.redis_master is first.redis_master
    assert not any("FROM endpoints WHERE name = %s" in query and "address" in query for query in cursor.queries)


def test_endpoint_version_bump_repoints_redis(directory):
    cursor = reader(directory)
    first = read_snapshot(cursor)
    execute(
        directory,
        "UPDATE endpoints SET address = '127.0.0.1:6380', version = version + 1 WHERE name = %s",
        (REDIS_MASTER_ENDPOINT,),
    )
    assert read_snapshot(cursor, first).redis_master == HostPort("127.0.0.1", 6380)


def test_missing_endpoint_row_leaves_master_unknown(directory):
    execute(directory, "DELETE FROM endpoints")
    assert read_snapshot(reader(directory)).redis_master is None


def test_directory_checks_versions_at_most_once_per_ttl_and_survives_outages(directory):
    now = [0.0]
    connections = PgConnections(directory["config"])
    cache = Directory(connections, directory["name"], ttl_seconds=1.0, clock=lambda: now[0])
    try:
        first = cache.snapshot()
        execute(directory, "UPDATE shard_map_version SET version = version + 1")
        now[0] = 0.5
        assert cache.snapshot() is first  # within the TTL: not asked again
        now[0] = 1.5
        execute(directory, "DELETE FROM shard_map WHERE logical_shard > 0")
        execute(directory, "UPDATE shard_map_version SET version = version + 1")
        assert cache.snapshot().shard_map.logical_shards == (0,)

        # A real outage: the database refuses new connections and the worker's is cut.
        with directory["admin"].cursor() as cursor:
            cursor.execute(f"ALTER DATABASE {directory['name']} ALLOW_CONNECTIONS false")
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = 'igops-app'",
                (directory["name"],),
            )
            assert cursor.fetchone()[0] == 1
        with pytest.raises(psycopg2.OperationalError, match="not currently accepting connections"):
            connect(directory["config"], directory["name"]).close()
        for moment in (3.0, 4.5):  # the cut connection, then a refused new one
            now[0] = moment
            # a stale map beats no map while the directory is unreachable
            assert cache.snapshot().shard_map.logical_shards == (0,)
    finally:
        connections.close()
        with directory["admin"].cursor() as cursor:
            cursor.execute(f"ALTER DATABASE {directory['name']} ALLOW_CONNECTIONS true")
