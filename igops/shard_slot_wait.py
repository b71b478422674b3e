"""Making a move's logical replication slot on the source, watched.

Postgres makes a logical slot (CREATE_REPLICATION_SLOT for the copy, pg_create_logical_replication_slot
for the verification's record of the rows written) only once every transaction that held a
transaction id when the creation began has ended, and then those that held one at the next point
it logs: one session left idle in its transaction, or a batch job's, holds the step, silently, for
as long as it stays open. While a creation runs, a thread of its own, on short-lived connections
to the source, names what it waits for after WARN_AFTER_S and again every WARN_EVERY_S, and past
SLOT_WAIT_LIMIT_S cancels it (pg_cancel_backend): the step fails as any failing step does, the
move stays resumable, and the error says which session to end. The server drops a slot whose
creation is cancelled (it is ephemeral, or temporary, until made)."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError, describe
from igops.output import plural
from igops.postgres_admin import connect
from igops.postgres_deadline import cut
from igops.secrets import redact
from igops.shard_move_steps import SLOT_WAIT_LIMIT_S

if TYPE_CHECKING:
    from types import TracebackType

    from psycopg2.extensions import connection as Connection

    from igops.shard_move_session import MoveSession

# A slot on a source without long transactions is made within a second or so: a wait past
# WARN_AFTER_S is one an operator wants to know about. Then a reminder a minute, not a stream.
WARN_AFTER_S = 5.0
WARN_EVERY_S = 60.0
SHOWN = 5  # transactions named in a warning or an error; the rest are counted
QUERY_SHOWN = 60  # characters of a session's statement shown, its constants masked
# The watcher's reads and its cancel end on their own, whatever the source does.
WATCH_SETTINGS = {"statement_timeout": "5s", "lock_timeout": "1s"}

# What waits: the creation's own session, found by its pid and its statement (which names the
# slot), so that neither a later statement of that session nor a session of that pid on another
# server (the source's primary changed meanwhile) is mistaken for it.
_CREATION = """
    SELECT query_start FROM pg_stat_activity WHERE pid = %(pid)s AND state = 'active' AND strpos(query, %(slot)s) > 0"""
# What it waits for: the transactions with an id that began before it (those Postgres waits for
# first), and whatever it is blocked on now (a transaction that got its id since, at the second
# point Postgres waits at). A transaction without an id (a read-only report) does not hold it.
_SESSIONS = f"""
    SELECT a.pid, a.usename, a.datname, a.backend_type, a.application_name, host(a.client_addr), a.state,
           extract(epoch FROM clock_timestamp() - a.xact_start)::float8, a.query
      FROM pg_stat_activity a
     WHERE a.pid NOT IN (%(pid)s, pg_backend_pid())
       AND (a.pid = ANY (pg_blocking_pids(%(pid)s))
            OR a.backend_xid IS NOT NULL AND a.xact_start < ({_CREATION}))
     ORDER BY a.xact_start, a.pid"""
# A prepared transaction (two-phase commit) holds its id until it is committed or rolled back,
# with no session at all: one a transaction manager forgot holds a slot's creation for ever.
_PREPARED = f"""
    SELECT gid, owner, database, extract(epoch FROM clock_timestamp() - prepared)::float8
      FROM pg_prepared_xacts WHERE prepared < ({_CREATION}) ORDER BY prepared"""
_CANCEL = f"SELECT pg_cancel_backend(%(pid)s) WHERE EXISTS ({_CREATION})"


@dataclass(frozen=True)
class Blocker:
    """A transaction a slot's creation waits for: what it is, and what ends it."""

    described: str
    remedy: str


class SlotCreationWatch:
    """Around the statement that makes slot `slot` on `creator` (a connection to the move's
    source, which runs nothing else meanwhile): a thread that warns while it waits and cancels
    it past SLOT_WAIT_LIMIT_S, the statement's failure then raised as an IgopsError that says
    what it waited for."""

    def __init__(self, session: MoveSession, creator: Connection, slot: str):
        self.session = session
        self.creator = creator
        self.pid = creator.get_backend_pid()
        self.slot = slot
        self.blockers: list[Blocker] | None = None  # as last read; None: never read
        self.gave_up = False
        self.cancelled = False  # on the server; else the creator's socket was cut
        self._connection: Connection | None = None
        self._over = threading.Event()
        self._lock = threading.Lock()  # no cancel once the statement is over
        self._thread = threading.Thread(target=self._watch, name=f"watch slot {slot}", daemon=True)

    def __enter__(self) -> SlotCreationWatch:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        import psycopg2

        with self._lock:
            self._over.set()
        self._thread.join()
        if self.gave_up and isinstance(exc, psycopg2.Error):
            raise self._failure() from None

    def _watch(self) -> None:
        started = time.monotonic()
        warn_at = WARN_AFTER_S
        try:
            while not self._over.wait(max(0.0, min(warn_at, SLOT_WAIT_LIMIT_S) - (time.monotonic() - started))):
                waited = time.monotonic() - started
                if waited >= SLOT_WAIT_LIMIT_S:
                    self._give_up()
                    return
                self._warn(waited)
                warn_at = waited + WARN_EVERY_S
        finally:
            if self._connection is not None:
                self._connection.close()

    def _warn(self, waited: float) -> None:
        plan = self.session.plan
        problem = self._read()
        if self._over.is_set():
            return
        if problem is not None:
            said = f"; what it waits for could not be read ({problem})"
        elif self.blockers:
            said = (
                f" for {plural(len(self.blockers), 'transaction')} open on {plan.source_primary} to end: "
                f"{_listed(self.blockers)}. Ending {'it' if len(self.blockers) == 1 else 'them'} ("
                + "; ".join(blocker.remedy for blocker in self.blockers[:SHOWN])
                + ") lets the move go on"
            )
        else:
            said = f"; no transaction open on {plan.source_primary} since before it began was found"
        self.session.reporter.log(
            f"warning: creating replication slot {self.slot} on {plan.source} ({plan.source_primary}) has waited "
            f"{_duration(waited)}{said}; igops gives up at {_duration(SLOT_WAIT_LIMIT_S)} (a logical slot is made "
            "once every transaction that had written when its creation began has ended)"
        )

    def _give_up(self) -> None:
        self._read()
        with self._lock:
            if self._over.is_set():
                return
            self.gave_up = True
            try:
                row = self._query(_CANCEL)
                self.cancelled = bool(row and row[0][0])
            except Exception:  # noqa: BLE001 - the source takes no new connection: the socket goes below
                self.cancelled = False
            if not self.cancelled:
                cut(self.creator)

    def _read(self) -> str | None:
        """Read what the creation waits for into `blockers`; what stopped it, if anything did."""
        try:
            self.blockers = [_session(row) for row in self._query(_SESSIONS)] + [
                _prepared(row) for row in self._query(_PREPARED)
            ]
        except Exception as exc:  # noqa: BLE001 - a warning says so; the watch, and its limit, go on
            return describe(exc)
        return None

    def _query(self, statement: str) -> list[tuple[Any, ...]]:
        """Rows of `statement` on the source, on the watch's own connection, opened again after a
        failure."""
        if self._connection is None or self._connection.closed:
            self._connection = connect(
                self.session.fleet,
                self.session.plan.source,
                self.session.database,
                autocommit=True,
                purpose="move-watch",
                settings=WATCH_SETTINGS,
            )
        try:
            with self._connection.cursor() as cursor:
                cursor.execute(statement, {"pid": self.pid, "slot": self.slot})
                return cursor.fetchall()
        except Exception:
            self._connection.close()
            raise

    def _failure(self) -> IgopsError:
        plan = self.session.plan
        what = (
            "its creation was cancelled and the slot not made"
            if self.cancelled
            else f"{plan.source_primary} did not take the cancel: igops cut its connection, and the slot may be "
            "made once what it waits for ends (a --resume or --abort drops it)"
        )
        blockers = self.blockers or []
        resume = f"`igops shard move --resume {plan.move_id}`"
        if blockers:
            waited_for = f"{plural(len(blockers), 'transaction')} open there: {_listed(blockers)}"
            hint = (
                f"on {plan.source_primary}: "
                + "; ".join(blocker.remedy for blocker in blockers[:SHOWN])
                + f" (or wait for {'it' if len(blockers) == 1 else 'them'} to end), then {resume}"
            )
        else:
            waited_for = "transactions open there, none of which could be named"
            hint = (
                f"look on {plan.source_primary} for a transaction open since before the move's step began "
                f"(pg_stat_activity, pg_prepared_xacts), end it or wait for it, then {resume}"
            )
        return IgopsError(
            f"creating replication slot {self.slot} on {plan.source} ({plan.source_primary}) waited "
            f"{_duration(SLOT_WAIT_LIMIT_S)} for {waited_for}; {what}",
            hint,
        )


def _session(row: tuple[Any, ...]) -> Blocker:
    pid, user, database, kind, application, address, state, open_s, query = row
    facts = [f"{user}@{database}" if user else kind]
    if user and kind != "client backend":
        facts.append(kind)
    if application:
        facts.append(f'application "{application}"')
    facts.append(f"from {address}" if address else "local")
    if state:
        facts.append(state)
    if open_s is not None:
        facts.append(f"transaction open {_duration(open_s)}")
    statement = statement_shape(query or "")
    if statement:
        facts.append(f"statement: {statement}")
    return Blocker(f"pid {pid} ({', '.join(facts)})", f"SELECT pg_terminate_backend({pid})")


def _prepared(row: tuple[Any, ...]) -> Blocker:
    gid, owner, database, open_s = row
    quoted = "'" + gid.replace("'", "''") + "'"
    return Blocker(
        f"prepared transaction {quoted} ({owner}@{database}, prepared {_duration(open_s)} ago)",
        f"ROLLBACK PREPARED {quoted} in database {database}",
    )


def _listed(blockers: list[Blocker]) -> str:
    shown = "; ".join(blocker.described for blocker in blockers[:SHOWN])
    return shown + (f"; and {len(blockers) - SHOWN} more" if len(blockers) > SHOWN else "")


# A statement's constants (strings, dollar-quoted bodies, numbers) and comments, with its quoted
# identifiers kept whole (a quote inside one starts no string).
_CONSTANTS = re.compile(
    r"""(?P<identifier>"(?:""|[^"])*"?)
      | (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
      | (?<![\w$])[Ee]'(?:''|\\.|[^'\\])*'?
      | (?<![\w$])(?:[BbXxNn]|[Uu]&)?'(?:''|[^'])*'?
      | (?P<dollar>\$(?:[A-Za-z_]\w*)?\$).*?(?:(?P=dollar)|\Z)
      | (?<![\w$.])(?:\d+\.?\d*|\.\d+)(?:[Ee][-+]?\d+)?""",
    re.VERBOSE | re.DOTALL,
)


def statement_shape(query: str) -> str:
    """The first QUERY_SHOWN characters of a statement with every constant shown as ?: it tells
    an operator which job it is without showing a value (a password in an ALTER ROLE, someone's
    data), and without its comments; registered secrets redacted besides. A statement cut short
    (pg_stat_activity keeps track_activity_query_size bytes) masks to its end."""

    def masked(match: re.Match[str]) -> str:
        if match.group("identifier"):
            return match.group(0)
        return " " if match.group("comment") else "?"

    shape = " ".join(_CONSTANTS.sub(masked, query).split())
    return redact(shape if len(shape) <= QUERY_SHOWN else shape[:QUERY_SHOWN] + "…")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"
