"""Deadlines on PostgreSQL connections, for work that must not wait on a server for ever: what
holds a shard's writes, or keeps a shard fenced, until it is done.

A `Deadline` is set where a connection is made (`igops.postgres.connect` takes its connection
parameters, `igops.postgres_admin.connect` its session settings too), or on a session for a
stretch of work (`session_deadline`). Each part ends a different wait:

- `connect_timeout`: a server that does not accept the connection;
- TCP keepalives: a peer gone quiet (a network black hole) while igops waits for an answer
  with nothing left to send; `tcp_user_timeout`: the same while what igops sent is not yet
  acknowledged, where keepalives do not run;
- `statement_timeout` and `lock_timeout`: a server that answers but is slow, or a statement
  queued behind another session's lock;
- `idle_in_transaction_session_timeout`: the other way round, a transaction left open by an
  igops that stopped talking, ended by the server (with the locks it held).

None of these ends a wait on a server process that is alive to its kernel but does not run (a
backend stuck on a dead disk, or stopped): its kernel keeps answering TCP and it fires no timer.
A `Watchdog` ends those from igops' side: past its time it shuts the connections' sockets down,
and the call blocked on one returns with an error.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection, cursor as Cursor


@dataclass(frozen=True)
class Deadline:
    connect_s: int  # libpq's connect_timeout, per address tried (whole seconds, at least 2)
    statement_ms: int | None
    lock_ms: int | None
    idle_in_transaction_ms: int | None
    keepalives_idle_s: int
    keepalives_interval_s: int
    keepalives_count: int
    tcp_user_timeout_ms: int

    def connection_parameters(self) -> dict[str, int]:
        """libpq's connection parameters (psycopg2.connect keywords)."""
        return {
            "connect_timeout": self.connect_s,
            "keepalives": 1,
            "keepalives_idle": self.keepalives_idle_s,
            "keepalives_interval": self.keepalives_interval_s,
            "keepalives_count": self.keepalives_count,
            "tcp_user_timeout": self.tcp_user_timeout_ms,
        }

    def session_settings(self) -> dict[str, str]:
        """The server's settings, for the session (those left unset are not named)."""
        values = {
            "statement_timeout": self.statement_ms,
            "lock_timeout": self.lock_ms,
            "idle_in_transaction_session_timeout": self.idle_in_transaction_ms,
        }
        return {name: _duration(ms) for name, ms in values.items() if ms is not None}


def _duration(ms: int) -> str:
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


@contextmanager
def session_deadline(connection: Connection, deadline: Deadline) -> Iterator[None]:
    """`deadline` on an open connection (autocommit, or between transactions) for the block, then
    the connection's own settings again: the session's settings, and its TCP keepalives and user
    timeout set on its socket as libpq would have set them. For a connection that also runs work
    no such deadline fits (a long decode, a wait through a network blip). A connection broken
    meanwhile is left as it is."""
    import psycopg2

    settings = deadline.session_settings()
    with connection.cursor() as cursor:
        cursor.execute("SELECT " + ", ".join("current_setting(%s)" for _ in settings), list(settings))
        row = cursor.fetchone()
        assert row is not None  # a SELECT without FROM returns one row
        before = dict(zip(settings, row, strict=True))
        _set(cursor, settings)
    try:
        with _tcp_deadline(connection, deadline):
            yield
    finally:
        if not connection.closed:
            try:
                with connection.cursor() as cursor:
                    _set(cursor, before)
            except psycopg2.Error:
                pass


@contextmanager
def _tcp_deadline(connection: Connection, deadline: Deadline) -> Iterator[None]:
    """The socket options libpq sets for `deadline`'s keepalives and tcp_user_timeout, on the
    connection's socket for the block (through a duplicate of its descriptor, kept meanwhile, so
    that the number cannot go to another socket), then their values before. Linux's options; a
    Unix socket has none."""
    import os
    import socket

    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, deadline.keepalives_idle_s),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, deadline.keepalives_interval_s),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, deadline.keepalives_count),
        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, deadline.tcp_user_timeout_ms),
    ]
    with socket.socket(fileno=os.dup(connection.fileno())) as duplicate:
        if duplicate.family not in (socket.AF_INET, socket.AF_INET6):
            yield
            return
        before = [(level, name, duplicate.getsockopt(level, name)) for level, name, _ in options]
        for level, name, value in options:
            duplicate.setsockopt(level, name, value)
        try:
            yield
        finally:
            try:
                for level, name, value in before:
                    duplicate.setsockopt(level, name, value)
            except OSError:  # cut meanwhile
                pass


def _set(cursor: Cursor, settings: dict[str, str]) -> None:
    cursor.execute(
        "SELECT " + ", ".join("set_config(%s, %s, false)" for _ in settings),
        [item for pair in settings.items() for item in pair],
    )


class Watchdog:
    """Cuts the connections it watches once `seconds` have passed before the block ends: each
    socket is shut down (from a thread of its own: the caller is blocked in libpq, which
    psycopg2 runs without the GIL), so the call waiting on it fails at once with an
    OperationalError and the connection is closed. `fired` says whether it did."""

    def __init__(self, seconds: float, connections: Sequence[Connection] = ()):
        self.seconds = seconds
        self.connections = list(connections)
        self.fired = False
        self._lock = threading.Lock()
        self._over = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:  # no cut once the block is over: a closed socket's number may be reused
            self._over = True
        self._timer.cancel()

    def cut_off(self, exc: BaseException) -> bool:
        """Whether `exc` is a connection's failure after this watchdog cut it."""
        import psycopg2

        return self.fired and isinstance(exc, psycopg2.Error)

    def _fire(self) -> None:
        with self._lock:
            if self._over:
                return
            self.fired = True
            for connection in self.connections:
                cut(connection)


def cut(connection: Connection) -> None:
    """Shut the connection's socket down: a call blocked on it in another thread returns with an
    error, whatever the server does."""
    import os
    import socket

    if connection.closed:
        return
    try:
        with socket.socket(fileno=os.dup(connection.fileno())) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):  # gone meanwhile
        pass


@contextmanager
def bounded(
    connections: Sequence[Connection], deadline: Deadline, seconds: float, also: Sequence[Connection] = ()
) -> Iterator[Watchdog]:
    """Work on `connections` under `deadline` (`session_deadline`), all of it (their own settings
    put back included) cut off after `seconds` by a Watchdog that watches `also` too."""
    with Watchdog(seconds, [*connections, *also]) as watchdog, ExitStack() as settings:
        for connection in connections:
            settings.enter_context(session_deadline(connection, deadline))
        yield watchdog
