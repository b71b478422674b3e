"""Postgres through PgBouncer in transaction pooling mode.

One connection per PgBouncer database, kept for the life of the worker. Every
unit of work is a short explicit transaction, because PgBouncer hands the
server connection to another client after each COMMIT: nothing may rely on
session state or server-side prepared statements.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from app.config import PostgresConfig
from app.retry import call_with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors after which the same work can succeed on a fresh connection or after
# a directory reload: PgBouncer or the server went away (failover), the
# target turned read-only (demoted primary), or a shard being moved was
# locked or removed at its old place (writes are rejected there before the
# map flips). All work run through `run` is idempotent, so retrying a
# transaction whose COMMIT outcome is unknown is safe.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    psycopg2.extensions.TransactionRollbackError,
    psycopg2.errors.ReadOnlySqlTransaction,
    psycopg2.errors.InsufficientPrivilege,
    psycopg2.errors.InvalidSchemaName,
    psycopg2.errors.UndefinedTable,
    psycopg2.errors.UndefinedFunction,
)

Cursor = psycopg2.extensions.cursor


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, RETRYABLE_ERRORS)


def connect(
    config: PostgresConfig, database: str, connect_timeout: int | None = None
) -> psycopg2.extensions.connection:
    connection = psycopg2.connect(
        host=config.host,
        port=config.port,
        user=config.user,
        password=config.password(),
        dbname=database,
        connect_timeout=connect_timeout or config.connect_timeout,
        application_name="igops-app",
        # notice a peer that vanished without closing the socket
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=3,
        keepalives_count=3,
    )
    connection.autocommit = False
    return connection


class PgConnections:
    def __init__(self, config: PostgresConfig):
        self.config = config
        self._connections: dict[str, psycopg2.extensions.connection] = {}

    def _connection(self, database: str) -> psycopg2.extensions.connection:
        connection = self._connections.get(database)
        if connection is None or connection.closed:
            connection = connect(self.config, database)
            self._connections[database] = connection
        return connection

    def _discard(self, database: str) -> None:
        connection = self._connections.pop(database, None)
        if connection is not None and not connection.closed:
            with suppress(psycopg2.Error):
                connection.close()

    @contextmanager
    def transaction(self, database: str) -> Iterator[Cursor]:
        connection = self._connection(database)
        try:
            with connection.cursor() as cursor:
                yield cursor
            connection.commit()
        except BaseException as exc:
            if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) or connection.closed:
                # the connection's state is unknown; a new one is cheap through PgBouncer
                self._discard(database)
            else:
                try:
                    connection.rollback()
                except psycopg2.Error:
                    self._discard(database)
            raise

    def run(
        self,
        resolve_database: Callable[[], str],
        work: Callable[[Cursor], T],
        *,
        before_retry: Callable[[BaseException], bool],
    ) -> T:
        """Run `work` in one transaction, retrying through failovers and shard
        moves; `resolve_database` is asked again before every try because a
        retry may follow a shard map reload."""

        def attempt() -> T:
            with self.transaction(resolve_database()) as cursor:
                return work(cursor)

        def log_and_prepare(exc: BaseException) -> bool:
            log.warning("retrying Postgres work after %s: %s", type(exc).__name__, str(exc).strip())
            return before_retry(exc)

        return call_with_retries(attempt, is_retryable=is_retryable, before_retry=log_and_prepare)

    def close(self) -> None:
        for database in list(self._connections):
            self._discard(database)
