"""The two moments of a move that hold the shard's writes. The verification: both copies
snapshotted at one point of the stream and compared, and from then on the key of every row
written recorded. The cut-over: the shard's tables locked on the source, the final catch-up, the
rows written since the verification compared, the target's sequences set past the source's, the
source's copy fenced (renamed), and the shard map switched to the target (shard_switch), none of
it waiting on a server without a deadline (shard_locks.CUTOVER_DEADLINE)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError, RefusedError, first_line
from igops.output import plural
from igops.postgres_admin import connect, quote_ident
from igops.postgres_deadline import bounded
from igops.shard_changes import ChangedRows
from igops.shard_locks import (
    CUTOVER_DEADLINE,
    HOLD_LIMIT_S,
    LOCK_SETTINGS,
    CutoverDeferred,
    lock_tables,
    wait_applied,
)
from igops.shard_map import directory_connection
from igops.shard_move_session import MoveSession, SessionPart
from igops.shard_move_steps import SEQUENCE_MARGIN
from igops.shard_replication import catch_up
from igops.shard_schema import describe_schema, sequence_values, tables_of
from igops.shard_slot_wait import SlotCreationWatch
from igops.shard_switch import commit_fence, commit_map, rollback_quietly, stage_in_hold, switch_map, undo_fence
from igops.shard_verify import ShardCopy, VerifyReport, verify_copies

if TYPE_CHECKING:
    from psycopg2.extensions import cursor as Cursor

CUTOVER_ATTEMPTS = 3
CUTOVER_CATCH_UP_S = 1.0  # the longest the cut-over waits, writes held, for the last changes
# The longest a resumed move that finds the source fenced waits for the target to apply and
# flush the shard's last changes (its subscription may be starting again after a restart).
FENCED_CATCH_UP_S = 30.0
MAX_CLOCK_SKEW_MS = 500
# After the fence, the longest the cut-over waits for the target's clock to pass the moment of
# the fence: the skew the check before the cut-over allows, and a second for the reads.
CLOCK_WAIT_S = MAX_CLOCK_SKEW_MS / 1000 + 1.0


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
        self.changes.start(SlotCreationWatch(self.session, self.session.source, self.changes.slot))
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
            # The shard is unavailable until the map switches: no wait here may be endless.
            with bounded(
                [self.session.source, self.session.target], CUTOVER_DEADLINE, FENCED_CATCH_UP_S + HOLD_LIMIT_S
            ) as watchdog:
                try:
                    lsn = _await_fenced_copy(self.session)
                except Exception as exc:
                    if not watchdog.cut_off(exc):
                        raise
                    raise IgopsError(
                        f"a server stopped answering while {plan.target} caught up with fenced {plan.source}: igops "
                        f"cut its connections after {watchdog.seconds:g} s ({first_line(exc)}); the map still "
                        f"places shard {plan.shard} on {plan.source}, where it is unavailable",
                        f"find the server that hung (`igops pg status`), then --resume {plan.move_id}; or "
                        f"--abort {plan.move_id} un-fences {plan.source}",
                    ) from None
            version = switch_map(self.session, lsn, None)
            return f"shard map version {version}"
        _check_clock_skew(self.session)
        timings, parts = self._holding_writes("cut-over", self._cut_over)
        self.close()  # the record of the rows written: a failure to drop it now is no failure of the switch
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
        bulk load, say), or the directory's rows stay locked, release the writes, catch up again
        and retry."""
        for attempt in range(1, CUTOVER_ATTEMPTS + 1):
            try:
                return action()
            except CutoverDeferred as exc:
                if attempt == CUTOVER_ATTEMPTS:
                    raise IgopsError(
                        f"{what} gave up after {attempt} attempts: {exc.message}",
                        "writes were released each time; "
                        + (f"{exc.hint}; " if exc.hint else "")
                        + f"--resume {self.plan.move_id} tries again",
                    ) from None
                self.reporter.log(f"{what} attempt {attempt}: {exc.message}; writes released, catching up again")
                catch_up(self.session)

    def _cut_over(self) -> tuple[dict[str, Any], dict[str, float]]:
        """The write block: from the lock request until the map names the target. Returns the
        step's result fields (the journal keeps them) and where the block went (its detail says).

        Every connection it uses waits on its server within CUTOVER_DEADLINE, and all of them
        are cut if the block outlasts HOLD_LIMIT_S. A failure before the fence commits releases
        the writes (the lock's transaction, the rename in it, and the staged map change are
        rolled back). After the fence, until the map's COMMIT is sent, the map cannot have
        changed: a failure there un-fences the source (`undo_fence`). Once that COMMIT is sent,
        only the directory can tell whether it took (`switch_map`)."""
        from psycopg2 import sql

        plan = self.plan
        locker = connect(
            self.fleet, plan.source, self.database, purpose="cutover", settings=LOCK_SETTINGS, deadline=CUTOVER_DEADLINE
        )
        try:
            directory = directory_connection(self.fleet, autocommit=False, purpose="cutover", deadline=CUTOVER_DEADLINE)
        except BaseException:
            locker.close()
            raise
        try:
            with locker.cursor() as cursor:
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
                with (
                    bounded(
                        [self.session.source, self.session.target], CUTOVER_DEADLINE, HOLD_LIMIT_S, (locker, directory)
                    ) as watchdog,
                    self.session.target.cursor() as target_cursor,
                ):
                    try:
                        requested = time.monotonic()
                        lock_tables(cursor, plan.schema, tables)
                        locked = time.monotonic()
                        self.session.pause("locked")
                        with self.session.source.cursor() as marker:
                            # Applied and flushed: the map must not name a target that could lose,
                            # in a crash, writes the source acknowledged (see shard_locks._wait_flushed).
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
                        version = stage_in_hold(self.session, directory, lsn, watchdog)
                        commit_fence(self.session, locker)
                    except Exception as exc:
                        if not watchdog.cut_off(exc):
                            raise
                        raise IgopsError(
                            f"a server stopped answering while the shard's writes were held: igops cut its "
                            f"connections after {watchdog.seconds:g} s ({first_line(exc)}); the lock's transaction "
                            "ends with them, and the shard map is unchanged",
                            f"find the server that hung (`igops pg status`), then --resume {plan.move_id}",
                        ) from None
                    fenced = time.monotonic()
                    try:
                        _wait_for_target_clock(self.session)
                        self.session.pause("fenced")
                    except BaseException as exc:
                        cause = exc
                        if watchdog.cut_off(exc):
                            cause = IgopsError(
                                f"a server stopped answering after the fence: igops cut its connections after "
                                f"{watchdog.seconds:g} s ({first_line(exc)})"
                            )
                        undo = undo_fence(self.session, directory, cause)
                        if undo is exc:
                            raise
                        raise undo from None
                    failure = commit_map(directory, watchdog)
                    switched = time.monotonic()
            # The connections of the write hold may be cut by now: a failed commit is tried again
            # on new ones.
            if failure is not None:
                version = switch_map(self.session, lsn, failure)
                switched = time.monotonic()
        except BaseException:
            rollback_quietly(directory)
            rollback_quietly(locker)
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
    """Until the target's clock has passed the last moment the source could mint an id (the
    fence has committed: the source's clock now is past it), so every id minted at the new place
    sorts after every id minted at the old one.

    Past CLOCK_WAIT_S it refuses rather than go on. The wait is what keeps the ids in order: the
    app sorts and pages by id, and the sequences' margin keeps ids from being equal only across
    a few ms of skew. A target whose clock has not passed the fence 1.5 s on is more than a second
    behind, beyond what the check before the cut-over allowed (its clock stepped back since, or
    the reads themselves stall): switching now would write ids out of order into the shard for
    as long as the skew lasts, for good, and no later step can take them back. A warning would
    come too late to matter. Refusing here costs little: the map's COMMIT has not been sent,
    so the cut-over un-fences the source (`undo_fence`) and the shard is back where it was,
    writes blocked a second and a half longer; the move stays resumable once the clock is fixed."""
    plan = session.plan
    with session.source.cursor() as cursor:
        fenced_at_ms = _clock_ms(cursor)
    with session.target.cursor() as cursor:
        short_ms = clock_passed(fenced_at_ms, lambda: _clock_ms(cursor), CLOCK_WAIT_S)
    if short_ms is not None:
        raise RefusedError(
            f"{plan.target_primary}'s clock had not reached the moment {plan.source_primary} was fenced "
            f"{CLOCK_WAIT_S:g} s after it (its last reading {short_ms} ms before it): ids minted on "
            f"{plan.target} now could sort before ids {plan.source} has issued, or equal one",
            f"fix time synchronisation on {plan.target_primary} (NTP: `chronyc tracking`)",
        )


def _clock_ms(cursor: Cursor) -> int:
    cursor.execute("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
    row = cursor.fetchone()
    assert row is not None  # a SELECT without FROM returns one row
    value: int = row[0]
    return value


def clock_passed(moment_ms: int, read_ms: Callable[[], int], budget_s: float) -> int | None:
    """Read a clock (`read_ms`) until it is past `moment_ms`: None once it is; if it is not
    within `budget_s` (read at least once), how many ms short its last reading was."""
    deadline = time.monotonic() + budget_s
    while True:
        reading = read_ms()
        if reading > moment_ms:
            return None
        if time.monotonic() > deadline:
            return moment_ms - reading
        time.sleep(0.001)
