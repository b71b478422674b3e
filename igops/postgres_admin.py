"""Direct connections to a cluster's primary for administrative work.

Replication set-up, locks held across statements and catalog changes must reach the server
itself, never PgBouncer: a transaction-pooled connection may hand each statement to another
server session. The primary is read from the inventory every time, since failovers move it;
the connection itself is `igops.postgres.connect`'s, with the session set up for this work.
"""

from __future__ import annotations

from typing import Any

from igops.errors import IgopsError, UsageError

# Checksums compare text renderings of rows: both sides must render them identically.
_STABLE_RENDERING = {"TimeZone": "UTC", "DateStyle": "ISO, YMD", "IntervalStyle": "postgres",
                     "extra_float_digits": "3"}


def primary_of(fleet, cluster: str):
    """The inventory host that is the cluster's primary now."""
    clusters = fleet.model.postgres.clusters
    if cluster not in clusters:
        known = ", ".join(clusters) or "none"
        raise UsageError(f"unknown Postgres cluster {cluster!r}", f"clusters in {fleet.source}: {known}")
    return fleet.host(clusters[cluster].primary)


def connect(fleet, cluster: str, database: str, *, autocommit: bool = False, purpose: str = "admin",
            settings: dict[str, Any] | None = None):
    """A new connection to the cluster's primary as the inventory's Postgres user; the caller
    closes it. `settings` are session parameters (e.g. lock_timeout) set before it is handed out."""
    from igops import postgres

    primary = primary_of(fleet, cluster)
    try:
        connection = postgres.connect(fleet, primary, database, timeout=5, statement_timeout_ms=None)
    except postgres.Unavailable as exc:
        raise IgopsError(f"cannot connect to {database} on {primary.name} (primary of {cluster}): {exc.detail}",
                         "check that the primary is up (igops status)") from None
    values = {**_STABLE_RENDERING, "application_name": f"igops-{purpose}", **(settings or {})}
    with connection.cursor() as cursor:
        cursor.execute("SELECT " + ", ".join("set_config(%s, %s, false)" for _ in values),
                       [item for pair in values.items() for item in (pair[0], str(pair[1]))])
    connection.autocommit = autocommit
    return connection


class primary_connection:
    """`connect` as a context manager that closes the connection on exit (psycopg2's own
    context manager only ends the transaction)."""

    def __init__(self, fleet, cluster: str, database: str, **kwargs: Any):
        self.args = (fleet, cluster, database)
        self.kwargs = kwargs

    def __enter__(self):
        self.connection = connect(*self.args, **self.kwargs)
        return self.connection

    def __exit__(self, *exc_info):
        self.connection.close()


def replication_connection(fleet, cluster: str, database: str, application_name: str):
    """A logical replication protocol connection to the cluster's primary (to create a slot
    that exports its snapshot); the caller closes it."""
    import psycopg2
    import psycopg2.extras

    from igops.secrets import Secrets

    model = fleet.model
    primary = primary_of(fleet, cluster)
    try:
        return psycopg2.connect(host=str(primary.address), port=model.postgres.port, user=model.postgres.user,
                                password=Secrets(model.secrets.file).get("postgres_password"), dbname=database,
                                connect_timeout=5, application_name=application_name,
                                connection_factory=psycopg2.extras.LogicalReplicationConnection)
    except psycopg2.OperationalError as exc:
        from igops.postgres import first_line

        raise IgopsError(f"cannot open a replication connection to {primary.name} (primary of {cluster}): "
                         f"{first_line(exc)}", "check pg_hba.conf and max_wal_senders there") from None


def replication_conninfo(fleet, cluster: str, database: str, application_name: str) -> str:
    """How another server reaches this cluster's primary for logical replication, password
    included: the receiving server's own environment cannot be relied on to hold one (a node
    restarted by a failover tool may not see its passfile). The caller must keep the result out
    of every log: see `quiet_statement_logging`."""
    from igops.secrets import Secrets

    model = fleet.model
    primary = primary_of(fleet, cluster)
    parts = {"host": str(primary.address), "port": model.postgres.port, "dbname": database,
             "user": model.postgres.user, "application_name": application_name, "connect_timeout": 10}
    password = Secrets(model.secrets.file).get("postgres_password")
    if password:
        parts["password"] = password
    return " ".join(f"{key}={_conninfo_value(value)}" for key, value in parts.items())


# A statement carrying a secret must not reach the server's log or pg_stat_statements.
QUIET_STATEMENT_LOGGING = {"log_statement": "none", "log_min_duration_statement": "-1",
                           "log_min_error_statement": "panic", "log_duration": "off",
                           "pg_stat_statements.track_utility": "off"}


def _conninfo_value(value: Any) -> str:
    text = str(value)
    if text and all(ch.isalnum() or ch in "._-/" for ch in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_ident(name: str) -> str:
    """A safe SQL identifier inside text that the server parses itself, e.g. a regclass."""
    return '"' + name.replace('"', '""') + '"'
