"""The two moments of a move that hold the shard's writes. The verification: both copies
snapshotted at one point of the stream and compared, and from then on the key of every row
written recorded. The cut-over: the shard's tables locked on the source, the final catch-up, the
rows written since the verification compared, the target's sequences set past the source's, the
source's copy fenced (renamed), and the shard map switched to the target."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError, RefusedError, first_line
from igops.output import plural
from igops.postgres_admin import connect, quote_ident
from igops.shard_changes import ChangedRows
from igops.shard_locks import LOCK_SETTINGS, CutoverDeferred, lock_tables, wait_applied
from igops.shard_map import directory_connection
from igops.shard_move_session import MoveSession, SessionPart
from igops.shard_move_steps import SEQUENCE_MARGIN
from igops.shard_replication import catch_up
from igops.shard_schema import describe_schema, sequence_values, tables_of
from igops.shard_verify import ShardCopy, VerifyReport, verify_copies

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection, cursor as Cursor

CUTOVER_ATTEMPTS = 3
CUTOVER_CATCH_UP_S = 1.0  # the longest the cut-over waits, writes held, for the last changes
# The longest a resumed move that finds the source fenced waits for the target to apply and
# flush the shard's last changes (its subscription may be starting again after a restart).
FENCED_CATCH_UP_S = 30.0
MAX_CLOCK_SKEW_MS = 500


class CutOver(SessionPart):
    """The steps `verified` and `switched` of a move, the two that hold the shard's writes. The
    verification starts the record of the rows written from then on, which the cut-over compares
    with writes held."""

    def __init__(self, session: MoveSession):
        super().__init__(session)
        self.verify_report: VerifyReport | None = None
        self.changes: ChangedRows | None = None  # from the verification on
        self.checked_rows = 0

    def close(self) -> None:
        import psycopg2

        if self.changes is not None:
            try:
                self.changes.close()
            except psycopg2.Error:  # the slot goes with the session anyway
                pass

    def verify(self) -> str:
        plan = self.plan
        if _source_fenced(self.session):  # a move resumed after the fence: only the map is left to switch
            return f"{plan.source} already fenced: nothing to verify"
        # From before the copies are compared, every row written is known by its key: with
        # writes held, the cut-over compares those rows only.
        with self.session.source.cursor() as cursor:
            shape = describe_schema(cursor, plan.schema)
        if shape is None:
            raise IgopsError(f"{plan.source}/{plan.schema} does not exist", "check the shard and the cluster")
        self.changes = ChangedRows(
            self.session.source,
            f"{plan.slot}_changes",
            plan.slot,
            plan.schema,
            {name: table.primary_key for name, table in shape.tables.items()},
        )
        self.changes.start()
        # The cut-over waits on this: an order-free row hash per table, a fifth of the cost of
        # the ordered checksums `igops shard verify` reports.
        report = self._holding_writes(
            "verification",
            lambda: verify_copies(
                self.fleet,
                plan.shard,
                ShardCopy(plan.source, plan.schema),
                ShardCopy(plan.target, plan.schema),
                plan.slot,
                self.reporter,
                ordered=False,
            ),
        )
        self.verify_report = report
        rows = sum(check.rows[f"{plan.source}/{plan.schema}"] for check in report.tables)
        if not report.equal:
            problems = report.schema_diff + [
                f"{check.table}: rows {check.rows}, first difference at {check.first_difference}"
                for check in report.tables
                if not check.equal
            ]
            raise IgopsError(
                f"the copies of {plan.schema} differ: " + "; ".join(problems[:5]),
                f"nothing was switched; investigate, then --resume {plan.move_id} to verify again "
                f"or --abort {plan.move_id}",
            )
        self.session.result_fields["verified"] = {"rows_copied": rows, "verify_pause_ms": report.pause_ms}
        return (
            f"{plural(len(report.tables), 'table')}, {rows:,} {'row' if rows == 1 else 'rows'} equal; "
            f"writes paused {report.pause_ms:.0f} ms"
        )

    def switch(self) -> str:
        plan = self.plan
        if _source_fenced(self.session):
            _check_target_copy(self.session)
            self.reporter.log(f"{plan.source} was already fenced ({plan.fenced_schema}): switching the map")
            version = _flip_map(self.session, _await_fenced_copy(self.session))
            return f"shard map version {version}"
        _check_clock_skew(self.session)
        timings, parts = self._holding_writes("cut-over", self._cut_over)
        self._changes().close()
        self.session.result_fields["switched"] = timings
        return (
            f"{self.checked_rows:,} rows written since the verification equal; "
            f"writes blocked {timings['write_block_ms']:.0f} ms (lock wait {timings['lock_wait_ms']:.0f} ms, "
            + ", ".join(f"{part} {ms:.0f}" for part, ms in parts.items())
            + "); "
            f"shard map version {timings['map_version']}"
        )

    def _holding_writes(self, what: str, action: Callable[[], Any]) -> Any:
        """Run a step that holds the shard's writes while the target applies the source's WAL.
        When the target is too far behind (WAL written since the catch-up, autovacuum after a
        bulk load, say), release the writes, catch up again and retry."""
        for attempt in range(1, CUTOVER_ATTEMPTS + 1):
            try:
                return action()
            except CutoverDeferred as exc:
                if attempt == CUTOVER_ATTEMPTS:
                    raise IgopsError(
                        f"{what} gave up after {attempt} attempts: {exc.message}",
                        f"writes were released each time; --resume {self.plan.move_id} tries again",
                    ) from None
                self.reporter.log(f"{what} attempt {attempt}: {exc.message}; writes released, catching up again")
                catch_up(self.session)

    def _cut_over(self) -> tuple[dict[str, Any], dict[str, float]]:
        """The write block: from the lock request until the map names the target. Returns the
        step's result fields (the journal keeps them) and where the block went (its detail says)."""
        from psycopg2 import sql

        plan = self.plan
        locker = connect(self.fleet, plan.source, self.database, purpose="cutover", settings=LOCK_SETTINGS)
        directory = directory_connection(self.fleet, autocommit=False, purpose="cutover")
        try:
            with locker.cursor() as cursor, self.session.target.cursor() as target_cursor:
                tables = tables_of(cursor, plan.schema)
                # Read before writes are held: the schema's shape (which sequences to carry over;
                # the move allows no DDL, and the verification compared both shapes), and most of
                # what was written since the verification.
                shape = describe_schema(cursor, plan.schema)
                if shape is None:
                    raise IgopsError(f"{plan.source}/{plan.schema} does not exist", "check the shard and the cluster")
                # Those reads began a transaction. Left open through the drain, which decodes all
                # the source's WAL since the verification (minutes of it after a bulk load or a
                # vacuum's freezing), it was idle long enough for the server to end the session
                # (idle_in_transaction_session_timeout), and the move failed at its cut-over.
                locker.rollback()
                self._changes().drain()
                requested = time.monotonic()
                lock_tables(cursor, plan.schema, tables)
                locked = time.monotonic()
                self.session.pause("locked")
                with self.session.source.cursor() as marker:
                    # Applied and flushed: the map must not name a target that could lose, in a
                    # crash, writes the source acknowledged (see shard_locks._wait_flushed).
                    lsn = wait_applied(target_cursor, plan.slot, marker, CUTOVER_CATCH_UP_S, flushed=True)
                caught_up = time.monotonic()
                checked = self._compare_changed_rows(target_cursor, lsn)
                compared = time.monotonic()
                sequences = sequence_values(cursor, plan.schema, shape.sequences)
                for sequence, value in sequences.items():
                    target_cursor.execute(
                        "SELECT setval(%s, %s)",
                        (f"{quote_ident(plan.schema)}.{quote_ident(sequence)}", value + SEQUENCE_MARGIN),
                    )
                sequenced = time.monotonic()
                cursor.execute(
                    sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(
                        sql.Identifier(plan.schema), sql.Identifier(plan.fenced_schema)
                    )
                )
                version = _stage_map_flip(self.session, directory, lsn)
                _commit_fence(self.session, locker)
                fenced = time.monotonic()
                _wait_for_target_clock(self.session)
                self.session.pause("fenced")
                version = _commit_map_flip(self.session, directory, version, lsn)
                switched = time.monotonic()
        except BaseException:
            _rollback_quietly(directory)
            _rollback_quietly(locker)
            raise
        finally:
            locker.close()
            directory.close()
        self.checked_rows = checked
        fields = {
            "lock_wait_ms": round((locked - requested) * 1000, 1),
            "write_block_ms": round((switched - requested) * 1000, 1),
            "map_version": version,
            "source_lsn": str(lsn),
            "source_sequence": max(sequences.values()) if sequences else None,
            "target_sequence": max(sequences.values()) + SEQUENCE_MARGIN if sequences else None,
        }
        # Where the block went: the target's catch-up to the source's last change, the rows
        # written since the verification compared, the sequences carried over, the fence and
        # the staged map committed on the source, then the wait for the target's clock and the
        # map's commit.
        parts = {
            "catch_up": round((caught_up - locked) * 1000, 1),
            "compare": round((compared - caught_up) * 1000, 1),
            "sequences": round((sequenced - compared) * 1000, 1),
            "fence": round((fenced - sequenced) * 1000, 1),
            "map": round((switched - fenced) * 1000, 1),
        }
        return fields, parts

    def _changes(self) -> ChangedRows:
        if self.changes is None:  # a resumed move verifies again: see resume_move
            raise IgopsError(
                f"move {self.plan.move_id} has no record of the rows written since its verification",
                f"--resume {self.plan.move_id} verifies again",
            )
        return self.changes

    def _compare_changed_rows(self, target_cursor: Cursor, lsn: str) -> int:
        """With writes held and the target caught up to `lsn`: the rows written since the
        verification, by key, on both copies (the copies were equal at the verification, and
        no other row has changed on the source since). Costs what was written since, not the
        shard's size; returns the rows compared."""
        changes = self._changes()
        changes.drain(upto=lsn)
        with self.session.source.cursor() as source_cursor:
            checked, differences = changes.compare((source_cursor, target_cursor), (self.plan.schema, self.plan.schema))
        if differences:
            raise IgopsError(
                f"the copies of {self.plan.schema} differ in rows written since the verification: "
                + "; ".join(differences[:5]),
                f"nothing was switched; --resume {self.plan.move_id} verifies again, or --abort {self.plan.move_id}",
            )
        return checked


def _source_fenced(session: MoveSession) -> bool:
    """Whether the cut-over already renamed the source's copy (and committed it)."""
    with session.source.cursor() as cursor:
        cursor.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)",
            ([session.plan.schema, session.plan.fenced_schema],),
        )
        present = {row[0] for row in cursor.fetchall()}
    return session.plan.fenced_schema in present and session.plan.schema not in present


def _check_target_copy(session: MoveSession) -> None:
    """A resumed move that finds the source fenced switches the map without verifying again,
    trusting the copy the cut-over caught up before it fenced. An --abort cut off between
    dropping the target's subscription and copy and renaming the source's back leaves the source
    fenced and that copy gone: switching then would send the shard's writes to nothing."""
    plan = session.plan
    with session.target.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s), "
            "EXISTS (SELECT 1 FROM pg_subscription WHERE subname = %s AND subslotname IS NOT NULL)",
            (plan.schema, plan.slot),
        )
        row = cursor.fetchone()
    assert row is not None  # a SELECT without FROM returns one row
    has_schema, subscribed = row
    if has_schema and subscribed:
        return
    missing = ", ".join(
        [f"no schema {plan.schema}"] * (not has_schema) + [f"no subscription {plan.slot}"] * (not subscribed)
    )
    raise RefusedError(
        f"{plan.source} is fenced but {plan.target}'s copy of shard {plan.shard} is gone ({missing}: "
        f"an --abort dropped it); the map still places the shard on {plan.source}",
        f"finish the abort with `igops shard move --abort {plan.move_id}`, which renames "
        f"{plan.fenced_schema} back to {plan.schema} on {plan.source}",
    )


def _await_fenced_copy(session: MoveSession) -> str:
    """A resumed move found the source fenced: before the map names the target, the target must
    have applied and flushed everything the source wrote before the fence. The igops that fenced
    saw it applied, but the target may have restarted since and lost an unflushed tail (its
    subscription commits asynchronously); the slot streams that tail again. Nothing reaches the
    shard on the source since the fence, so a mark written now is past all of it, and is what the
    cleanup waits for the target to confirm. Returns that mark. The shard is unavailable until the
    map switches, so this waits longer than the cut-over does; past that, it stops with the map
    unchanged, for another --resume or an --abort (which un-fences the source)."""
    plan = session.plan
    with session.source.cursor() as marker, session.target.cursor() as cursor:
        try:
            return wait_applied(cursor, plan.slot, marker, FENCED_CATCH_UP_S, flushed=True)
        except CutoverDeferred as exc:
            raise IgopsError(
                f"{plan.source} is fenced but {plan.target} has not applied and flushed the shard's last "
                f"changes ({exc.message}): the map still places shard {plan.shard} on {plan.source}, where "
                "it is unavailable",
                f"read {plan.target_primary}'s Postgres log (subscription {plan.slot} must run), then "
                f"--resume {plan.move_id} again; or --abort {plan.move_id} un-fences {plan.source}",
            ) from None


def _check_clock_skew(session: MoveSession) -> None:
    """Ids start with their server's clock: a target far behind the source would mint
    ids that sort before ones already issued."""
    readings: list[float] = []
    for connection in (session.source, session.target):
        with connection.cursor() as cursor:
            before = time.time()
            cursor.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
            row = cursor.fetchone()
            assert row is not None  # a SELECT without FROM returns one row
            readings.append(row[0] - (before + time.time()) / 2)
    skew_ms = (readings[0] - readings[1]) * 1000
    if skew_ms > MAX_CLOCK_SKEW_MS:
        raise RefusedError(
            f"{session.plan.target_primary}'s clock is {skew_ms:.0f} ms behind {session.plan.source_primary}'s",
            "fix time synchronisation (NTP), then --resume",
        )


def _wait_for_target_clock(session: MoveSession) -> None:
    """Until the target's clock has passed the last moment the source could mint an id,
    so every id minted at the new place sorts after every id minted at the old one."""
    with session.source.cursor() as cursor:
        cursor.execute("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
        row = cursor.fetchone()
        assert row is not None  # a SELECT without FROM returns one row
        fenced_at_ms = row[0]
    deadline = time.monotonic() + MAX_CLOCK_SKEW_MS / 1000 + 1
    with session.target.cursor() as cursor:
        while True:
            cursor.execute("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint > %s", (fenced_at_ms,))
            passed = cursor.fetchone()
            assert passed is not None  # a SELECT without FROM returns one row
            if passed[0] or time.monotonic() > deadline:
                return
            time.sleep(0.001)


def _commit_fence(session: MoveSession, locker: Connection) -> None:
    import psycopg2

    try:
        locker.commit()
    except psycopg2.Error as exc:
        raise IgopsError(
            f"committing the fence on {session.plan.source} failed ({first_line(exc)}): "
            f"{session.plan.schema} may or may not be renamed there; the map is unchanged",
            f"--resume {session.plan.move_id} finds out and finishes, or --abort {session.plan.move_id}",
        ) from None


def _stage_map_flip(session: MoveSession, directory: Connection, lsn: str) -> int:
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


def _flip_map(session: MoveSession, lsn: str) -> int:
    directory = directory_connection(session.fleet, autocommit=False, purpose="cutover")
    try:
        version = _stage_map_flip(session, directory, lsn)
        directory.commit()
        return version
    finally:
        directory.close()


def _commit_map_flip(session: MoveSession, directory: Connection, version: int, lsn: str) -> int:
    """The source is fenced now: until the map names the target the shard is unavailable,
    so a failed commit is retried on fresh connections before giving up."""
    import psycopg2

    try:
        directory.commit()
        return version
    except psycopg2.Error as exc:
        failure = first_line(exc)
    for _ in range(5):
        time.sleep(0.5)
        try:
            return _flip_map(session, lsn)
        except RefusedError:  # the move is no longer active: trying again changes nothing
            raise
        except (psycopg2.Error, IgopsError) as exc:
            failure = exc.one_line() if isinstance(exc, IgopsError) else first_line(exc)
    raise IgopsError(
        f"{session.plan.source} is fenced but the shard map could not be switched ({failure}): "
        f"shard {session.plan.shard} is unavailable",
        f"igops shard move --resume {session.plan.move_id} as soon as the directory answers",
    )


def _rollback_quietly(connection: Connection) -> None:
    import psycopg2

    try:
        if not connection.closed:
            connection.rollback()
    except psycopg2.Error:
        pass
