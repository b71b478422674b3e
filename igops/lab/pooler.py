"""The lab's PgBouncer as `lab up` leaves it: its databases file re-read, nothing paused, and a
write through each of its databases reaching a primary.

An operation interrupted between PAUSE and RESUME (a killed switchover, say) leaves databases
paused and every query waiting; `lab up` is the command that brings the lab back to health, so
it resumes them, except where an igops operation on that cluster is still running (it holds the
cluster's lock and will resume them itself).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from igops.lab.credentials import Credentials
from igops.lab.services import PGBOUNCER_ADMIN, pgbouncer_databases
from igops.lab.state import CLUSTERS, PGBOUNCER_PORT, with_role

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection, cursor as Cursor

    from igops.coordination import EtcdCoordinator, LocalCoordinator

APP_USER = "app"
CONNECT_TIMEOUT_S = 5
# A paused database makes the probe's query wait (up to query_wait_timeout, 20 s): the probe
# cancels it after this long and reports the database as not taking writes.
WRITE_PROBE_TIMEOUT_S = 5.0
# A write that only a primary accepts, undone at once: a temporary table and a row in it.
WRITE_PROBE_SQL = (
    "CREATE TEMP TABLE igops_lab_write_probe (at timestamptz) ON COMMIT DROP; "
    "INSERT INTO igops_lab_write_probe VALUES (now())"
)


def address() -> str:
    return with_role("pgbouncer")[0].address


@contextmanager
def admin(credentials: Credentials) -> Iterator[Cursor]:
    """An autocommit connection to PgBouncer's admin console."""
    import psycopg2

    connection = psycopg2.connect(
        host=address(),
        port=PGBOUNCER_PORT,
        user=PGBOUNCER_ADMIN,
        dbname="pgbouncer",
        password=credentials.pgbouncer_password,
        connect_timeout=CONNECT_TIMEOUT_S,
    )
    connection.autocommit = True
    try:
        yield connection.cursor()
    finally:
        connection.close()


def paused_databases(cursor: Cursor) -> list[str]:
    cursor.execute("SHOW DATABASES")
    assert cursor.description is not None  # SHOW returns rows
    columns = [column.name for column in cursor.description]
    rows = [dict(zip(columns, row, strict=False)) for row in cursor.fetchall()]
    return [row["name"] for row in rows if row["name"] != "pgbouncer" and int(row.get("paused") or 0)]


def bring_to_health(
    credentials: Credentials, coordinator: LocalCoordinator | EtcdCoordinator, command_line: str, reload: bool
) -> list[str]:
    """RELOAD (when the lab rewrote the databases file), then RESUME every paused database of a
    cluster no igops operation is working on (`coordinator`: where the lab inventory's leases
    live). Returns what was done and what was left."""
    from igops import coordination
    from igops.errors import AlreadyRunning
    from igops.operations import conflicts

    done = []
    with admin(credentials) as cursor:
        if reload:
            cursor.execute("RELOAD")
            done.append("reloaded the databases file")
        paused = set(paused_databases(cursor))
        for cluster in CLUSTERS:
            mine = sorted(paused & set(pgbouncer_databases(cluster.name)))
            if not mine:
                continue
            try:
                # The lease `igops pg switchover` and `failover` hold: taking it both proves no
                # operation is under way and keeps one from starting while this resumes.
                holder = coordination.current_holder("lab-up", cluster.name, command_line, None)
                with coordinator.lease([conflicts.pg_cluster(cluster.name)], holder):
                    for database in mine:
                        cursor.execute(f'RESUME "{database}"')
                    done.append(f"resumed {', '.join(mine)} (cluster {cluster.name})")
            except AlreadyRunning as exc:
                done.append(f"left {', '.join(mine)} paused: {exc.message}")
    return done


@dataclass(frozen=True)
class WriteProbe:
    cluster: str
    database: str
    endpoint: str
    ok: bool
    detail: str


def write_probes(credentials: Credentials) -> list[WriteProbe]:
    """For each cluster, a write through each of its PgBouncer databases, rolled back: only a
    primary takes it, so it fails when PgBouncer routes to a standby or holds the database paused."""
    return [
        _write_probe(credentials, cluster.name, database)
        for cluster in CLUSTERS
        for database in pgbouncer_databases(cluster.name)
    ]


def _write_probe(credentials: Credentials, cluster: str, database: str) -> WriteProbe:
    import psycopg2

    endpoint = f"{address()}:{PGBOUNCER_PORT}/{database}"
    connection: Connection | None = None
    cancelled = threading.Event()

    def cancel() -> None:
        cancelled.set()
        assert connection is not None  # the timer starts once it is connected
        connection.cancel()

    try:
        connection = psycopg2.connect(
            host=address(),
            port=PGBOUNCER_PORT,
            user=APP_USER,
            dbname=database,
            password=credentials.app_password,
            connect_timeout=CONNECT_TIMEOUT_S,
        )
        timer = threading.Timer(WRITE_PROBE_TIMEOUT_S, cancel)
        timer.start()
        try:
            with connection.cursor() as cursor:
                cursor.execute(WRITE_PROBE_SQL)
                cursor.execute("SELECT inet_server_addr()")
                row = cursor.fetchone()
                assert row is not None  # a SELECT without FROM returns one row
                server = row[0]
            connection.rollback()
        finally:
            timer.cancel()
    except psycopg2.Error as exc:
        reason = (
            f"no answer within {WRITE_PROBE_TIMEOUT_S:g} s (is it PAUSED?)"
            if cancelled.is_set()
            else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        )
        return WriteProbe(cluster, database, endpoint, False, f"cluster {cluster}: a write failed: {reason}")
    finally:
        if connection is not None:
            connection.close()
    return WriteProbe(cluster, database, endpoint, True, f"cluster {cluster}: a write reached {server} (rolled back)")
