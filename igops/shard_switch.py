"""The fence of a move's cut-over and the shard map switch that follows it: the map change staged
in the directory with the shard's writes held, the fence committed on the source, the map's
commit; a failure between the two undone (the source un-fenced) while the map's COMMIT has not
been sent, and after it the switch tried again on new connections, which find out whether it
took. `unfence` is the --abort's too."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from igops.errors import IgopsError, RefusedError, describe, first_line
from igops.postgres_admin import connect
from igops.postgres_deadline import Watchdog
from igops.shard_locks import CUTOVER_DEADLINE, HOLD_LIMIT_S, CutoverDeferred
from igops.shard_map import directory_connection

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

    from igops.shard_move_session import MoveSession

# After the fence, how long a map switch whose commit failed is tried again on new connections
# (a directory failing over, a connection lost), the shard unavailable all along.
MAP_RETRY_S = 30.0


def commit_fence(session: MoveSession, locker: Connection) -> None:
    import psycopg2

    try:
        locker.commit()
    except psycopg2.Error as exc:
        raise IgopsError(
            f"committing the fence on {session.plan.source} failed ({first_line(exc)}): "
            f"{session.plan.schema} may or may not be renamed there; the map is unchanged",
            f"--resume {session.plan.move_id} finds out and finishes, or --abort {session.plan.move_id}",
        ) from None


def stage_map_flip(session: MoveSession, directory: Connection, lsn: str) -> int:
    """The map change and its journal entry, left uncommitted so the commit right after the
    fence is the only thing between them. `lsn` lies past the shard's last change on the
    source: the cleanup drops nothing before the target has flushed up to it."""
    plan = session.plan
    with directory.cursor() as cursor:
        cursor.execute(
            "UPDATE shard_map SET cluster = %s WHERE logical_shard = %s AND cluster = %s",
            (plan.target, plan.shard, plan.source),
        )
        if cursor.rowcount != 1:
            raise IgopsError(
                f"the shard map no longer places shard {plan.shard} on {plan.source}",
                "someone changed the map during the move; nothing was switched",
            )
        cursor.execute("UPDATE shard_map_version SET version = version + 1, updated_at = now() RETURNING version")
        row = cursor.fetchone()
        if row is None:
            raise IgopsError("the directory has no shard map version", "run `igops shard init`")
        version: int = row[0]
        # Only while the move is active: a mover whose journal session (and with it the shard's
        # move lock) was lost may be overtaken by an --abort from elsewhere, which drops the
        # target's copy; the map must then stay where it is.
        cursor.execute(
            "UPDATE shard_moves SET step = 'switched', map_version = %s, source_lsn = %s, "
            "updated_at = now(), error = NULL, history = history || jsonb_build_array("
            "jsonb_build_object('step', 'switched', 'at', now())) WHERE id = %s AND status = 'active'",
            (version, lsn, plan.move_id),
        )
        if cursor.rowcount != 1:
            raise RefusedError(
                f"move {plan.move_id} is no longer active in the journal (aborted from elsewhere?): "
                f"the shard map was not switched",
                "see `igops shard moves`; the shard stays where the map places it",
            )
    return version


def stage_in_hold(session: MoveSession, directory: Connection, lsn: str, watchdog: Watchdog) -> int:
    """`stage_map_flip` with the shard's writes held (the source renamed, not yet committed): a
    lock on the directory's rows that outlasts lock_timeout releases the writes and tries again
    (another move's cut-over holds them for a moment, an operator's open transaction for longer);
    any other failure releases them and stops."""
    import psycopg2

    plan = session.plan
    try:
        return stage_map_flip(session, directory, lsn)
    except psycopg2.Error as exc:
        if watchdog.cut_off(exc):
            raise  # the cut-over says so
        if not isinstance(exc, psycopg2.errors.LockNotAvailable):
            raise IgopsError(
                f"the directory did not take the shard map change ({first_line(exc)}): writes released, "
                "the map unchanged",
                f"check the directory's primary (`igops pg status {session.fleet.directory_cluster}`), "
                f"then --resume {plan.move_id}",
            ) from None
        raise CutoverDeferred(
            f"the directory rows the switch changes (shard {plan.shard}'s in shard_map, shard_map_version's, "
            f"move {plan.move_id}'s in shard_moves) stayed locked by another session for over "
            f"{CUTOVER_DEADLINE.lock_ms} ms",
            "if that persists, end the session holding them on the directory's primary (pg_locks joined with "
            "pg_stat_activity names it: an open transaction on shard_map, say)",
        ) from None


def commit_map(directory: Connection, watchdog: Watchdog) -> str | None:
    """Send the map change's COMMIT: None when it took, else why it is not known to have."""
    import psycopg2

    try:
        directory.commit()
        return None
    except psycopg2.Error as exc:
        if watchdog.cut_off(exc):
            return f"no answer within {watchdog.seconds:g} s of the write hold"
        return first_line(exc)


def undo_fence(session: MoveSession, directory: Connection, exc: BaseException) -> BaseException:
    """The cut-over failed after the fence, before the map's COMMIT was sent: the staged map
    change is rolled back, and cannot be committed now whatever the directory does (it is only
    ever committed by a COMMIT on this connection), so the source's copy can be renamed back
    (`unfence`, on a new connection: the lock session may be cut) and the shard served there
    again, as an --abort would. Returns the error to raise: `exc` itself if it is not an error
    (an interrupt), else one saying what was undone."""
    import psycopg2

    plan = session.plan
    rollback_quietly(directory)
    directory.close()
    session.reporter.log(f"warning: {describe(exc)}; un-fencing {plan.source} (the shard map was not switched)")
    try:
        connection = connect(
            session.fleet, plan.source, session.database, autocommit=True, purpose="cutover", deadline=CUTOVER_DEADLINE
        )
        try:
            with Watchdog(HOLD_LIMIT_S, [connection]):
                unfence(connection, plan.schema, plan.fenced_schema)
        finally:
            connection.close()
    except (psycopg2.Error, IgopsError) as failure:
        outcome = (
            f"the shard map was not switched, and un-fencing {plan.source} failed ({describe(failure)}): "
            f"shard {plan.shard} is unavailable"
        )
        then = (
            f"`igops shard move --abort {plan.move_id}` renames {plan.fenced_schema} back to {plan.schema} "
            f"on {plan.source}; --resume {plan.move_id} switches the map instead"
        )
    else:
        outcome = f"the shard map was not switched and {plan.source} was un-fenced: shard {plan.shard} is served there"
        then = f"--resume {plan.move_id} verifies again and cuts over"
    if not isinstance(exc, Exception):
        session.reporter.log(outcome)
        return exc
    if isinstance(exc, RefusedError):
        return RefusedError(f"{exc.message}; {outcome}", f"{exc.hint}, then {then}" if exc.hint else then)
    return IgopsError(f"{exc.message if isinstance(exc, IgopsError) else describe(exc)}; {outcome}", then)


def unfence(connection: Connection, schema: str, fenced_schema: str) -> bool:
    """Rename the source's fenced copy back, if a cut-over fenced it; whether it did."""
    from psycopg2 import sql

    with connection.cursor() as cursor:
        cursor.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", ([schema, fenced_schema],))
        present = {row[0] for row in cursor.fetchall()}
        if fenced_schema not in present or schema in present:
            return False
        cursor.execute(
            sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(fenced_schema), sql.Identifier(schema))
        )
    return True


def switch_map(session: MoveSession, lsn: str, failure: str | None) -> int:
    """Switch the map with the source fenced, on new directory connections, for MAP_RETRY_S at
    most: after a cut-over's COMMIT that failed (`failure`), or for a resumed move that found
    the source fenced (None). Each try first looks whether an earlier COMMIT took (its answer
    lost). Past that, igops stops with the source fenced: whether a COMMIT took is the directory's
    to say, and un-fencing the source while the map may name the target would let writes land
    on both copies."""
    import psycopg2

    plan = session.plan
    if failure is not None:
        session.reporter.log(
            f"the shard map's commit failed ({failure}) with {plan.source} fenced: trying the switch on new "
            f"connections for up to {MAP_RETRY_S:g} s (each first looks whether that commit took)"
        )
    deadline = time.monotonic() + MAP_RETRY_S
    while True:
        if failure is not None:
            time.sleep(0.5)
        try:
            return flip_map(session, lsn)
        except RefusedError:  # the move is no longer active: trying again changes nothing
            raise
        except (psycopg2.Error, IgopsError) as exc:
            failure = exc.one_line() if isinstance(exc, IgopsError) else first_line(exc)
        if time.monotonic() > deadline:
            break
    raise IgopsError(
        f"{plan.source} is fenced but the shard map could not be switched ({failure}), tried for "
        f"{MAP_RETRY_S:g} s: shard {plan.shard} is unavailable",
        f"igops shard move --resume {plan.move_id} as soon as the directory answers: it switches the map, "
        f"or finds it switched; --abort {plan.move_id} un-fences {plan.source} if the map still places it there",
    )


def flip_map(session: MoveSession, lsn: str) -> int:
    """One try at the map switch on a new directory connection: the version it got, or the
    version of an earlier switch of this move that took."""
    import psycopg2

    directory = directory_connection(session.fleet, autocommit=False, purpose="cutover", deadline=CUTOVER_DEADLINE)
    try:
        with Watchdog(HOLD_LIMIT_S, [directory]) as watchdog:
            try:
                with directory.cursor() as cursor:
                    cursor.execute(
                        "SELECT map_version FROM shard_moves WHERE id = %s AND step = 'switched'",
                        (session.plan.move_id,),
                    )
                    switched = cursor.fetchone()
                if switched is not None:
                    directory.rollback()
                    version: int = switched[0]
                    return version
                version = stage_map_flip(session, directory, lsn)
                directory.commit()
                return version
            except psycopg2.Error as exc:
                if watchdog.cut_off(exc):
                    raise IgopsError(f"the directory did not answer within {watchdog.seconds:g} s") from exc
                raise
    finally:
        directory.close()


def rollback_quietly(connection: Connection) -> None:
    import psycopg2

    try:
        if not connection.closed:
            connection.rollback()
    except psycopg2.Error:
        pass
