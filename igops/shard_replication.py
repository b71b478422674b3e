"""A move's logical replication objects and the waits on them: the publication on the source,
the subscription on the target streaming from the move's slot, the wait until the target has
caught up (its workers watched), the wait until the target has flushed what it applied, and
dropping the subscription, slot and publication again."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError, first_line
from igops.output import human_bytes, plural
from igops.postgres_admin import QUIET_STATEMENT_LOGGING, connect, replication_conninfo
from igops.shard_journal import Journal
from igops.shard_move_session import MoveSession

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection, cursor as Cursor

# How long the cleanup waits for the target to report having flushed the shard's last changes
# (the subscriber reports within a WAL writer cycle or two).
FLUSH_WAIT_S = 60


def publish(session: MoveSession) -> str:
    from psycopg2 import sql

    with session.source.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (session.plan.slot,))
        if cursor.fetchone() is not None:
            return "already published"
        cursor.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLES IN SCHEMA {}").format(
                sql.Identifier(session.plan.slot), sql.Identifier(session.plan.schema)
            )
        )
    return f"{session.plan.schema} published"


def subscribe(session: MoveSession) -> str:
    import psycopg2
    from psycopg2 import sql

    plan = session.plan
    with session.target.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (plan.slot,))
        if cursor.fetchone() is not None:
            return "already subscribed"
    # Its own session: the statement carries the source's password, so this session
    # logs no statements, and ends with it.
    connection = connect(
        session.fleet, plan.target, session.database, autocommit=True, purpose="move", settings=QUIET_STATEMENT_LOGGING
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                sql.SQL(
                    "CREATE SUBSCRIPTION {name} CONNECTION %s PUBLICATION {name} "
                    "WITH (create_slot = false, slot_name = %s, copy_data = false)"
                ).format(name=sql.Identifier(plan.slot)),
                (replication_conninfo(session.fleet, plan.source, session.database, plan.slot), plan.slot),
            )
    except psycopg2.Error as exc:
        raise IgopsError(
            f"{plan.target} cannot subscribe to {plan.source}: {first_line(exc)}",
            f"{plan.target_primary} must reach {plan.source_primary}:{session.fleet.model.postgres.port} "
            f"as {session.fleet.model.postgres.user} (pg_hba.conf, the secret postgres_password)",
        ) from None
    finally:
        connection.close()
    return f"{plan.target_primary} streams from {plan.source_primary}"


def _check_workers(session: MoveSession, cursor: Cursor, before: int | None) -> int:
    """Fail when the subscription's workers keep erroring (their messages are in the target's log), or when
    the slot they read is gone (a new source primary has no logical slots)."""
    cursor.execute(
        "SELECT sync_error_count + apply_error_count FROM pg_stat_subscription_stats WHERE subname = %s",
        (session.plan.slot,),
    )
    row = cursor.fetchone()
    count = row[0] if row else 0
    if before is not None and count - before >= 3:
        raise IgopsError(
            f"the subscription's workers on {session.plan.target_primary} keep failing ({plural(count, 'error')})",
            f"read {session.plan.target_primary}'s Postgres log; then --resume or --abort {session.plan.move_id}",
        )
    with session.source.cursor() as source_cursor:
        usable = slot_usable(source_cursor, session.plan.slot)
    if usable is None:
        raise IgopsError(
            f"replication slot {session.plan.slot} is gone from {session.plan.source}",
            f"the primary changed? --resume {session.plan.move_id} starts the copy again",
        )
    if not usable:
        raise IgopsError(
            f"replication slot {session.plan.slot} on {session.plan.source} was invalidated: the target "
            f"fell further behind than max_slot_wal_keep_size allows",
            f"--resume {session.plan.move_id} starts the copy again",
        )
    return count if before is None else before


def catch_up(session: MoveSession) -> str:
    plan = session.plan
    deadline = time.monotonic() + 600
    last_log = time.monotonic()
    errors_seen = None
    with session.target.cursor() as cursor, session.source.cursor() as source_cursor:
        while True:
            source_cursor.execute("SELECT pg_current_wal_lsn()")
            position = source_cursor.fetchone()
            assert position is not None  # a SELECT without FROM returns one row
            current = position[0]
            applied = _applied_lsn(cursor, plan.slot)
            if applied is not None:
                source_cursor.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::bigint", (current, applied))
                difference = source_cursor.fetchone()
                assert difference is not None  # a SELECT without FROM returns one row
                lag: int = max(0, difference[0])
                if lag <= plan.max_lag_bytes:
                    return f"{human_bytes(lag)} behind"
                if time.monotonic() - last_log > 5:
                    last_log = time.monotonic()
                    session.reporter.log(f"catching up: {human_bytes(lag)} behind {plan.source}")
            errors_seen = _check_workers(session, cursor, errors_seen)
            if time.monotonic() > deadline:
                raise IgopsError(
                    f"{plan.target} did not catch up with {plan.source} within 10 minutes",
                    f"writes outpace the apply worker? --resume {plan.move_id} keeps waiting",
                )
            time.sleep(0.1)


def await_target_flush(session: MoveSession, journal: Journal) -> str:
    """Until the target has flushed every change of the shard it applied: the subscription
    commits asynchronously (synchronous_commit = off), so a change applied can still be lost
    if the target crashes, and only the slot and the old copy could then bring it back. The
    slot's confirmed_flush_lsn is what the subscriber reports after flushing; the position to
    reach was journaled with the map switch."""
    plan = session.plan
    assert plan.move_id is not None  # the journal has the move by its cut-over
    lsn = journal.get(plan.move_id).source_lsn
    deadline = time.monotonic() + FLUSH_WAIT_S
    with session.source.cursor() as cursor, session.target.cursor() as target_cursor:
        while True:
            cursor.execute(
                "SELECT confirmed_flush_lsn >= %s::pg_lsn, confirmed_flush_lsn "
                "FROM pg_replication_slots WHERE slot_name = %s",
                (lsn, plan.slot),
            )
            row = cursor.fetchone()
            if row is None:  # dropped by a cleanup that got past this wait
                return "no slot left"
            if row[0]:
                return f"{plan.target} flushed up to {lsn}"
            target_cursor.execute(
                "SELECT subenabled, subslotname IS NOT NULL FROM pg_subscription WHERE subname = %s", (plan.slot,)
            )
            subscription = target_cursor.fetchone()
            state = (
                "missing"
                if subscription is None
                else "detached from its slot"
                if not subscription[1]
                else None
                if subscription[0]
                else "disabled"
            )
            waited = time.monotonic() > deadline
            if state or waited:
                why = f"its subscription {plan.slot} is {state}" if state else f"not within {FLUSH_WAIT_S:.0f} s"
                raise IgopsError(
                    f"{plan.target} has not confirmed flushing the shard's changes up to {lsn} "
                    f"(the slot is at {row[1]}), {why}: nothing was dropped",
                    (
                        f"ALTER SUBSCRIPTION {plan.slot} ENABLE on {plan.target_primary}, then "
                        if state == "disabled"
                        else f"read {plan.target_primary}'s Postgres log, then "
                    )
                    + f"igops shard move --resume {plan.move_id}",
                )
            time.sleep(0.05)


def _applied_lsn(cursor: Cursor, subscription: str) -> Any:
    """What the subscription's apply worker has applied and reported, or None when no
    worker runs."""
    cursor.execute(
        "SELECT pid, latest_end_lsn FROM pg_stat_subscription WHERE subname = %s AND relid IS NULL", (subscription,)
    )
    row = cursor.fetchone()
    return row[1] if row and row[0] else None


def slot_usable(cursor: Cursor, slot: str) -> bool | None:
    """None when the slot does not exist; False when Postgres invalidated it (it no longer holds
    the WAL its subscriber needs)."""
    cursor.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    row = cursor.fetchone()
    return None if row is None else row[0] != "lost"


def drop_subscription(connection: Connection, name: str) -> bool:
    """Drop a subscription without needing its publisher: detach it from its slot first (the
    slot is dropped on the source separately)."""
    from psycopg2 import sql

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (name,))
        if cursor.fetchone() is None:
            return False
        identifier = sql.Identifier(name)
        cursor.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(identifier))
        cursor.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(identifier))
        cursor.execute(sql.SQL("DROP SUBSCRIPTION {}").format(identifier))
    return True


def drop_publication_and_slot(
    connection: Connection, name: str, wait_s: float = 15, keep_publication: bool = False
) -> str:
    """Drop the move's slot once no sender reads it (a disabled subscription's sender exits
    within moments) and its publication. A slot left behind would keep WAL forever."""
    from psycopg2 import sql

    dropped = []
    with connection.cursor() as cursor:
        deadline = time.monotonic() + wait_s
        while True:
            cursor.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,))
            row = cursor.fetchone()
            if row is None:
                break
            if row[0] is None:
                cursor.execute("SELECT pg_drop_replication_slot(%s)", (name,))
                dropped.append("slot")
                break
            if time.monotonic() > deadline:
                cursor.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                deadline = time.monotonic() + wait_s
            time.sleep(0.1)
        cursor.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,))
        if cursor.fetchone() is not None and not keep_publication:
            cursor.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(name)))
            dropped.append("publication")
    return (" and ".join(dropped) + " dropped") if dropped else "no slot or publication left"
