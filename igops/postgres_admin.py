"""Direct connections to a cluster's primary for administrative work.

Replication set-up, locks held across statements and catalog changes must reach the server
itself, never PgBouncer: a transaction-pooled connection may hand each statement to another
server session. The primary is found, not read from the inventory: a switchover or failover
moves it and the inventory keeps naming the members as they were. The connection itself is
`igops.postgres.connect`'s, with the session set up for this work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError

if TYPE_CHECKING:
    from types import TracebackType

    from psycopg2.extensions import connection as Connection
    from psycopg2.extras import LogicalReplicationConnection

    from igops.inventory import Fleet
    from igops.postgres_deadline import Deadline

# Checksums compare text renderings of rows: both sides must render them identically.
_STABLE_RENDERING = {"TimeZone": "UTC", "DateStyle": "ISO, YMD", "IntervalStyle": "postgres", "extra_float_digits": "3"}


# The member last found to be each cluster's primary (by inventory file and cluster): asked
# first next time, so finding it costs one connection unless it has moved.
_last_primary: dict[tuple[str, str], str] = {}


def _members(fleet: Fleet, cluster: str) -> list[str]:
    """The cluster's members, the one that last answered as its primary first."""
    from igops.pg.cluster import cluster_members

    members = cluster_members(fleet, cluster)
    last = _last_primary.get((str(fleet.source), cluster))
    return ([last] if last in members else []) + [name for name in members if name != last]


def _open_primary(
    fleet: Fleet, cluster: str, database: str, values: dict[str, Any], deadline: Deadline | None = None
) -> tuple[Any, Connection]:
    """(host, connection) of the member that accepts writes, its session set to `values`.
    Members are asked one at a time, the last primary first; a standby's answer is not enough."""
    from igops import postgres

    refusals = []
    for name in _members(fleet, cluster):
        host = fleet.host(name)
        try:
            connection = postgres.connect(
                fleet, host, database, timeout=5, statement_timeout_ms=None, deadline=deadline
            )
        except postgres.Unavailable as exc:
            refusals.append(f"{name}: {exc.detail}")
            continue
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_is_in_recovery()" + "".join(", set_config(%s, %s, false)" for _ in values),
                [item for pair in values.items() for item in (pair[0], str(pair[1]))],
            )
            row = cursor.fetchone()
            assert row is not None  # a SELECT without FROM returns one row
            in_recovery = row[0]
        if not in_recovery:
            _last_primary[(str(fleet.source), cluster)] = name
            return host, connection
        connection.close()
        refusals.append(f"{name}: a standby")
    raise IgopsError(
        f"no member of Postgres cluster {cluster} accepts writes ({'; '.join(refusals)})",
        f"`igops pg status {cluster}` shows the cluster; `igops pg failover {cluster}` promotes a standby",
    )


def last_primary(fleet: Fleet, cluster: str) -> str:
    """The member last found to be the primary in this process, else the inventory's."""
    return _last_primary.get((str(fleet.source), cluster), fleet.model.postgres.clusters[cluster].primary)


def primary_of(fleet: Fleet, cluster: str) -> Any:
    """The inventory host that is the cluster's primary now."""
    host, connection = _open_primary(fleet, cluster, "postgres", {})
    connection.close()
    return host


def connect(
    fleet: Fleet,
    cluster: str,
    database: str,
    *,
    autocommit: bool = False,
    purpose: str = "admin",
    settings: dict[str, Any] | None = None,
    deadline: Deadline | None = None,
) -> Connection:
    """A new connection to the cluster's primary as the inventory's Postgres user; the caller
    closes it. `settings` are session parameters (e.g. lock_timeout) set before it is handed out,
    over those of `deadline` (igops.postgres_deadline), which bounds each wait on the server."""
    values = {**_STABLE_RENDERING, "application_name": f"igops-{purpose}", **(settings or {})}
    _, connection = _open_primary(fleet, cluster, database, values, deadline)
    connection.autocommit = autocommit
    return connection


class primary_connection:
    """`connect` as a context manager that closes the connection on exit (psycopg2's own
    context manager only ends the transaction)."""

    def __init__(self, fleet: Fleet, cluster: str, database: str, **kwargs: Any):
        self.args = (fleet, cluster, database)
        self.kwargs = kwargs

    def __enter__(self) -> Connection:
        self.connection = connect(*self.args, **self.kwargs)
        return self.connection

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.connection.close()


def replication_connection(
    fleet: Fleet, cluster: str, database: str, application_name: str
) -> LogicalReplicationConnection:
    """A logical replication protocol connection to the cluster's primary (to create a slot
    that exports its snapshot); the caller closes it."""
    import psycopg2
    import psycopg2.extras

    from igops.secrets import Secrets

    model = fleet.model
    primary = primary_of(fleet, cluster)
    try:
        return psycopg2.connect(
            host=str(primary.address),
            port=model.postgres.port,
            user=model.postgres.user,
            password=Secrets(model.secrets.file).get("postgres_password"),
            dbname=database,
            connect_timeout=5,
            application_name=application_name,
            connection_factory=psycopg2.extras.LogicalReplicationConnection,
        )
    except psycopg2.OperationalError as exc:
        from igops.errors import first_line

        raise IgopsError(
            f"cannot open a replication connection to {primary.name} (primary of {cluster}): {first_line(exc)}",
            "check pg_hba.conf and max_wal_senders there",
        ) from None


def replication_conninfo(fleet: Fleet, cluster: str, database: str, application_name: str) -> str:
    """How another server reaches this cluster's primary for logical replication, password
    included: the receiving server's own environment cannot be relied on to hold one (a node
    restarted by a failover tool may not see its passfile). The caller must keep the result out
    of every log: see `quiet_statement_logging`."""
    from igops.secrets import Secrets

    model = fleet.model
    primary = primary_of(fleet, cluster)
    parts = {
        "host": str(primary.address),
        "port": model.postgres.port,
        "dbname": database,
        "user": model.postgres.user,
        "application_name": application_name,
        "connect_timeout": 10,
    }
    password = Secrets(model.secrets.file).get("postgres_password")
    if password:
        parts["password"] = password
    return " ".join(f"{key}={_conninfo_value(value)}" for key, value in parts.items())


# A statement carrying a secret must not reach the server's log or pg_stat_statements.
QUIET_STATEMENT_LOGGING = {
    "log_statement": "none",
    "log_min_duration_statement": "-1",
    "log_min_error_statement": "panic",
    "log_duration": "off",
    "pg_stat_statements.track_utility": "off",
}


def _conninfo_value(value: Any) -> str:
    text = str(value)
    if text and all(ch.isalnum() or ch in "._-/" for ch in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_ident(name: str) -> str:
    """A safe SQL identifier inside text that the server parses itself, e.g. a regclass."""
    return '"' + name.replace('"', '""') + '"'
