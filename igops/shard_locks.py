"""Holding a shard's writes at one point of the replication stream, for the instants a move's
verification and cut-over need: the shard's tables locked against writes (never waiting long
for the lock), a position in the source's WAL past everything committed before it, and the wait
until the target has applied the source's WAL up to there (and, before the map may name the
target, flushed it). When the moment is not right, `CutoverDeferred`: the writes are released
and the caller tries again."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from igops.errors import IgopsError
from igops.postgres_deadline import Deadline

if TYPE_CHECKING:
    from psycopg2.extensions import cursor as Cursor

# Every connection a move uses while the shard's writes are held (from the cut-over's lock
# request until the map names the target) or the shard is fenced (its source copy renamed, the
# map not yet switched) waits on its server within this deadline: the lock session, the
# directory's, the journal's, and the move's own connections to the source and the target.
# A hung directory or target must not leave the shard blocked with igops waiting for ever.
# - statement_timeout 10 s: as long as the lock session may sit idle in its transaction (below)
#   before the server ends it; a statement elsewhere that takes longer has cost the lock anyway.
# - lock_timeout 2 s: the directory rows a cut-over changes (the shard's map row, the map
#   version, the move's journal row) are held by another move's cut-over from its staging to
#   its commit, across its wait for the target's clock (at most 1.5 s); writes wait meanwhile.
# - idle_in_transaction_session_timeout 10 s: an igops gone quiet loses its transactions, and
#   the writes or the map rows they hold, within 10 s (the server's own TCP keepalive takes hours).
# - a peer silent for about 10 s is taken for dead: keepalives (4 s idle, then 3 probes 2 s
#   apart) while igops waits for an answer, tcp_user_timeout while what it sent is unacknowledged.
CUTOVER_DEADLINE = Deadline(
    connect_s=5,
    statement_ms=10_000,
    lock_ms=2_000,
    idle_in_transaction_ms=10_000,
    keepalives_idle_s=4,
    keepalives_interval_s=2,
    keepalives_count=3,
    tcp_user_timeout_ms=10_000,
)
# Past this, a Watchdog cuts the connections of a write hold (igops.postgres_deadline): every
# wait within it ends by its own deadline well before (a lock wait, a catch-up, a statement),
# so only a server process that no longer runs (stopped, stuck on a dead disk) gets this far.
HOLD_LIMIT_S = 30.0

# The cut-over's lock must never wait long (writers queue behind a waiting lock), and its
# transaction must die with igops: the server ends it if igops stops talking, releasing writes.
# An autovacuum of a shard table holds a lock that EXCLUSIVE mode waits for (a bulk delete or
# load sets one off, and on a big table it runs for minutes). The server cancels an autovacuum
# that blocks a lock request (not one against wraparound), but only at the requester's deadlock
# check, deadlock_timeout after it began to wait: 1 s by default, after this lock has given up.
# A session setting (superuser, as igops' role is) makes that check come at 50 ms.
LOCK_TIMEOUT_MS = 1000
LOCK_SETTINGS = {
    **CUTOVER_DEADLINE.session_settings(),
    "lock_timeout": f"{LOCK_TIMEOUT_MS}ms",
    "deadlock_timeout": "50ms",
}


class CutoverDeferred(IgopsError):
    """Writes were held but the moment was not right: they are released and it is tried again."""


def lock_tables(cursor: Cursor, schema: str, tables: list[str]) -> None:
    """Block writes, not reads. It must be the transaction's first statement when the
    transaction's snapshot is to show everything committed before the lock. A lock that
    cannot be had within lock_timeout defers the attempt (writers queue behind a waiting lock)."""
    import psycopg2
    from psycopg2 import sql

    try:
        cursor.execute(
            sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(
                sql.SQL(", ").join(sql.Identifier(schema, table) for table in tables)
            )
        )
    except psycopg2.errors.LockNotAvailable:
        raise CutoverDeferred(
            f"{schema}'s tables could not be locked within {LOCK_TIMEOUT_MS} ms "
            "(a long transaction, or a VACUUM against wraparound, holds them?)"
        ) from None


def flushed_position(cursor: Cursor) -> str:
    """A position in the source's WAL up to which its walsender can decode and report now: the
    end of a logical message (which no subscription receives) committed in a transaction of its
    own, whose commit flushes the WAL through it. `cursor` is on an autocommit connection to
    the source's primary, not the one holding the shard's lock (or to the target's: see
    `wait_applied`).

    The current WAL position would not do: it can be a page boundary inside a record that an
    open transaction is writing. The WAL writer flushes whole pages only, a walsender decodes
    whole flushed records only, and on an idle source nothing flushes the rest of that record
    until that transaction ends (the lock's own, which waits on the position, or another
    one): the wait can never end (seen after a checkpoint, when the lock's catalog reads
    write full-page images for hint bits)."""
    import psycopg2

    cursor.execute("BEGIN")
    try:
        # A commit that waited on a synchronous standby would hold the shard's writes longer,
        # or for ever with that standby down; this one only has to reach the local disk.
        cursor.execute("SET LOCAL synchronous_commit = local")
        cursor.execute("SELECT pg_logical_emit_message(true, 'igops-shard-move', 'position')")
        row = cursor.fetchone()
        assert row is not None  # a SELECT without FROM returns one row
        position: str = row[0]
        cursor.execute("COMMIT")
    except psycopg2.Error:
        # The connection goes on being used: leave no failed transaction open on it.
        if not cursor.connection.closed:
            try:
                cursor.execute("ROLLBACK")
            except psycopg2.Error:
                pass
        raise
    return position


def wait_applied(
    cursor: Cursor, subscription: str, source_cursor: Cursor, budget_s: float, flushed: bool = False
) -> str:
    """Until the subscription has applied the source's WAL up to a position past everything
    committed before now (see `flushed_position`, which `source_cursor` writes); returns that
    position. Its apply worker reports a position only after applying everything before it.
    With `flushed`, also until the target has flushed what it applied (see `_wait_flushed`),
    within the same `budget_s`."""
    lsn = flushed_position(source_cursor)
    deadline = time.monotonic() + budget_s
    while True:
        cursor.execute(
            "SELECT latest_end_lsn >= %s::pg_lsn FROM pg_stat_subscription "
            "WHERE subname = %s AND relid IS NULL AND pid IS NOT NULL",
            (lsn, subscription),
        )
        row = cursor.fetchone()
        if row and row[0]:
            break
        if time.monotonic() > deadline:
            raise CutoverDeferred(
                f"the target did not apply the source's WAL up to {lsn} within {budget_s * 1000:.0f} ms"
            )
        time.sleep(0.002)
    if flushed:
        _wait_flushed(cursor, lsn, deadline, budget_s)
    return lsn


def _wait_flushed(cursor: Cursor, lsn: str, deadline: float, budget_s: float) -> None:
    """Until the target has flushed to its disk every transaction its subscription has applied.

    The apply worker commits with synchronous_commit = off (a subscription's default): what it
    applied reaches the target's disk within a WAL writer cycle or so. A target that crashed
    before then would come back without that tail while the map sends the app's writes to it:
    rows the app was told were written are missing, and the tail, streamed again from the slot,
    lands after newer writes (over them, or failing on them). So, once the apply is seen,
    a transaction of this session commits on the target with a flush (`flushed_position`): the
    WAL is flushed in order, so through every commit the apply worker made before it; the
    target's flush position is then read back past it.

    Not the source slot's confirmed_flush_lsn: the subscriber reports it only with its next
    feedback, up to a second later on an idle source (its wait between messages), with writes
    held all along. Not the subscription with synchronous_commit on: every transaction it applies
    during the whole move (the copy's catch-up included) would wait for a flush, and its one
    apply worker would fall behind a busy shard."""
    position = flushed_position(cursor)
    while True:
        cursor.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (position,))
        row = cursor.fetchone()
        if row and row[0]:
            return
        if time.monotonic() > deadline:
            raise CutoverDeferred(
                f"the target applied the source's WAL up to {lsn} but did not flush it within {budget_s * 1000:.0f} ms"
            )
        time.sleep(0.002)
