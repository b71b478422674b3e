"""What every probe of a `igops check` run shares: the run's Context (the fleet, the hosts
checked, the deadline, the Munin samples, and each Postgres member's view of itself, asked once
per run and judged by both the Postgres and the PgBouncer checks), and small helpers."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from igops.checks import munin as munin_checks
from igops.errors import first_line
from igops.secrets import Secrets

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

    from igops.inventory import Fleet
    from igops.inventory_model import Host, PostgresCluster
    from igops.snapshot_groups import SnapshotGroup

PROBE_TIMEOUT = 5.0


@dataclass
class Context:
    fleet: Fleet
    hosts: list[Host]
    timeout: float
    samples: munin_checks.Samples | None
    _views: dict[str, dict[str, MemberView]] = field(default_factory=dict, init=False, repr=False)
    _views_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _groups: list[SnapshotGroup] | Exception | None = field(default=None, init=False, repr=False)
    _groups_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def probe_timeout(self) -> float:
        return min(PROBE_TIMEOUT, self.timeout)

    @cached_property
    def secrets(self) -> Secrets:
        return Secrets(self.fleet.model.secrets.file)

    def snapshot_groups(self) -> list[SnapshotGroup]:
        """Every snapshot group, listed once per run (one EC2 client, one listing): the snapshot
        and the drill checks both judge them. A failure to list raises in both."""
        with self._groups_lock:
            if self._groups is None:
                from igops import snapshot_groups
                from igops.ebs import Ebs

                try:
                    self._groups = snapshot_groups.groups(Ebs(self.fleet))
                except Exception as exc:  # noqa: BLE001 - each probe reports it as UNKNOWN
                    self._groups = exc
            found = self._groups
        if isinstance(found, Exception):
            raise found
        return found

    def postgres_views(self, cluster_name: str) -> dict[str, MemberView]:
        """Each member of a cluster as it sees itself, asked once per run: the Postgres and
        the PgBouncer checks both judge against the live primary (a failover does not
        rewrite the inventory, which only names the members)."""
        with self._views_lock:
            if cluster_name not in self._views:
                cluster = self.fleet.model.postgres.clusters[cluster_name]
                members = [cluster.primary, *cluster.standbys]
                with ThreadPoolExecutor(max_workers=len(members)) as pool:
                    self._views[cluster_name] = dict(zip(members, pool.map(self._member_view, members), strict=False))
            return self._views[cluster_name]

    def _member_view(self, name: str) -> MemberView:
        import psycopg2

        view = MemberView()
        try:
            connection = postgres_connect(self, self.fleet.host(name), self.probe_timeout)
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SET statement_timeout = %s", (int(self.probe_timeout * 1000),))
                    cursor.execute(
                        "SELECT pg_is_in_recovery(), (SELECT status FROM pg_stat_wal_receiver LIMIT 1), "
                        "pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
                        "ELSE pg_current_wal_lsn() END, '0/0')::bigint"
                    )
                    row = cursor.fetchone()
                    assert row is not None, "a SELECT without FROM returns one row"
                    view.in_recovery, view.receiver, view.wal_lsn = row
                    if not view.in_recovery:
                        try:
                            # Assigning a transaction id writes and flushes WAL: the cheapest real write.
                            cursor.execute("SELECT txid_current()")
                        except psycopg2.Error as exc:
                            view.write_error = first_line_of(exc)
                        cursor.execute(
                            "SELECT application_name, state, "
                            "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint "
                            "FROM pg_stat_replication"
                        )
                        view.replication = {name: (state, lag) for name, state, lag in cursor.fetchall()}
            finally:
                connection.close()
        except Exception as exc:  # noqa: BLE001
            view.error = first_line_of(exc)
        return view


@dataclass
class MemberView:
    """One Postgres member as it sees itself."""

    in_recovery: bool | None = None  # None: it could not be asked (see error)
    receiver: str | None = None  # its WAL receiver's status
    write_error: str | None = None  # out of recovery, yet a write failed
    replication: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # standby -> (state, lag)
    # Where its WAL is: a primary's insert position, a standby's replay position, as it says.
    wal_lsn: int | None = None
    error: str | None = None


def live_primary(cluster: PostgresCluster, views: dict[str, MemberView]) -> str | None:
    """The member out of recovery; of two (a split brain), the one standbys stream from."""
    out = [name for name, view in views.items() if view.in_recovery is False]
    return max(out, key=lambda name: (len(views[name].replication), name == cluster.primary), default=None)


def first_line_of(exc: BaseException) -> str:
    """An error as a probe reports it: its first line, at most 200 characters."""
    return first_line(exc)[:200]


def elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def postgres_connect(context: Context, host: Host, timeout: float, database: str = "postgres") -> Connection:
    import psycopg2

    model = context.fleet.model
    connection = psycopg2.connect(
        host=str(host.address),
        port=model.postgres.port,
        user=model.postgres.user,
        dbname=database,
        password=context.secrets.get("postgres_password"),
        connect_timeout=max(1, int(timeout)),
        application_name="igops-check",
    )
    connection.autocommit = True
    return connection
