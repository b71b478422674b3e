"""A move's logical replication slots wait for the transactions open on the source: igops says
which, and stops the step past a limit instead of waiting for ever, against real PostgreSQL 15
servers (test_shard_cutover_deadlines' two clusters: main the source, with the directory; pg2 the
target), real moves of a small shard. The limit and the warnings' pace are shortened here.

- A session left idle in a transaction that has written (BEGIN; SELECT txid_current()) on the
  source before the copy: the copy's slot warns, naming that session by its pid (its statement's
  constants masked), a few times, not a stream; past the limit the copy fails, the hint saying
  how to end the session and resume, the move journaled as failed and resumable, no slot left
  on the source. Once the session is gone, --resume finishes the move.
- The same at the verification's temporary slot, with a prepared transaction besides (one a
  transaction manager forgot holds a slot as surely, with no session to end).
- A transaction that ends by itself within the limit: named while it lasts, then the move goes on.
- A source that takes no new connection when the limit comes, so that the cancel cannot be sent:
  the creation's own connection is cut and the step fails in time all the same; a slot made after
  all is dropped by the --resume.
- A report's read-only transaction (a snapshot, no transaction id) holds no slot: the move goes on,
  and it is not named.
- Without servers: how a statement is shown."""

import threading
import time

import pytest

from igops import shard_slot_wait
from igops.errors import IgopsError
from igops.shard_slot_wait import statement_shape
from tests.unit import postgres_servers as servers, test_shard_cutover_deadlines
from tests.unit.test_shard_cutover_deadlines import (
    ADDRESSES,
    MOVE_LIMIT_S,
    Clusters,
    Said,
    at_pause_point,
    last_move_id,
    resume_finishes,
    start,
)

needs_postgres = servers.needs_postgres
# Its fixtures: the template (which can prepare transactions) and the two clusters made from it.
template = test_shard_cutover_deadlines.template
clusters = test_shard_cutover_deadlines.clusters
LIMIT_S = 6.0


@pytest.fixture
def shortened(monkeypatch):
    """A warning after 1 s, then every 2 s; the step stops at LIMIT_S."""
    monkeypatch.setattr(shard_slot_wait, "WARN_AFTER_S", 1.0)
    monkeypatch.setattr(shard_slot_wait, "WARN_EVERY_S", 2.0)
    monkeypatch.setattr(shard_slot_wait, "SLOT_WAIT_LIMIT_S", LIMIT_S)


def open_transaction(clusters: Clusters, database: str = "instagram"):
    """A session on the source that has written, then sits idle in its transaction; with its pid.
    Its statement carries a value that must not be shown."""
    import psycopg2

    connection = psycopg2.connect(
        host=ADDRESSES["db1"], port=clusters.port, user="postgres", dbname=database, application_name="nightly report"
    )
    with connection.cursor() as cursor:
        cursor.execute("SELECT txid_current(), 'hunter2-secret' AS note")
    return connection, connection.get_backend_pid()


def slots(clusters: Clusters) -> list[str]:
    with clusters.session("db1", "postgres") as cursor:
        cursor.execute("SELECT slot_name FROM pg_replication_slots ORDER BY 1")
        return [row[0] for row in cursor.fetchall()]


def warnings(said: Said, move_id: int, slot: str = "") -> list[str]:
    prefix = f"warning: creating replication slot igops_move_{move_id}{slot} on main (db1) has waited"
    return [line for line in said.lines if line.startswith(prefix)]


def step(said: Said, beginning: str) -> tuple[str, float, str]:
    return next(step for step in said.steps if step[0].startswith(beginning))


@needs_postgres
def test_a_transaction_left_open_on_the_source_is_named_and_stops_the_copy_in_time(clusters, shortened):
    blocker, pid = open_transaction(clusters)
    said = Said()
    try:
        move = start(clusters, said)
        assert move.done_within(MOVE_LIMIT_S), "the copy waits for the open transaction with no end"
        move_id = last_move_id(clusters)
        title, seconds, status = step(said, "on main (db1): logical replication slot")
        assert status == "failed" and LIMIT_S <= seconds < LIMIT_S + 10
        assert isinstance(move.error, IgopsError)
        message, hint = move.error.message, move.error.hint
        assert message.startswith(
            f"creating replication slot igops_move_{move_id} on main (db1) waited 6 s for 1 transaction open "
            f'there: pid {pid} (postgres@instagram, application "nightly report", from 127.'
        )
        assert ", idle in transaction, transaction open " in message
        assert "statement: SELECT txid_current(), ? AS note)" in message
        assert message.endswith("; its creation was cancelled and the slot not made")
        assert hint == (
            f"on db1: SELECT pg_terminate_backend({pid}) (or wait for it to end), then "
            f"`igops shard move --resume {move_id}`"
        )
        # Said while it waited, naming the session: at 1, 3 and 5 s.
        said_while_waiting = warnings(said, move_id)
        assert 2 <= len(said_while_waiting) <= 4
        assert all(f": pid {pid} (postgres@instagram" in line for line in said_while_waiting)
        assert all(
            f"Ending it (SELECT pg_terminate_backend({pid})) lets the move go on" in line for line in said_while_waiting
        )
        assert not any("hunter2" in line for line in [*said.lines, message])
        # Failed as a step fails: journaled, resumable, and no slot left behind to hold WAL.
        status, step_done, error = clusters.journal(move_id)
        assert (status, step_done) == ("active", "published") and error.startswith("creating replication slot")
        assert slots(clusters) == []
        assert clusters.placement() == "main"
    finally:
        blocker.close()
    resume_finishes(clusters, move_id)


@needs_postgres
def test_the_verification_slot_names_a_session_and_a_prepared_transaction_and_stops_in_time(
    clusters, shortened, monkeypatch
):
    opened = []

    def transactions_open():  # after the copy: the verification's slot is the one that waits
        opened.append(open_transaction(clusters, "postgres"))
        prepared = clusters.connect("db1", "postgres")
        prepared.autocommit = False
        with prepared.cursor() as cursor:
            cursor.execute("SELECT txid_current()")
            cursor.execute("PREPARE TRANSACTION 'forgotten by the manager'")
        prepared.close()

    said = Said()
    with at_pause_point(monkeypatch, "caught_up", transactions_open):
        move = start(clusters, said)
        try:
            assert move.done_within(MOVE_LIMIT_S), "the verification waits for the open transactions with no end"
            blocker, pid = opened[0]
            move_id = last_move_id(clusters)
            title, seconds, status = step(said, "on main (db1): temporary slot")
            assert status == "failed" and seconds < LIMIT_S + 10
            assert isinstance(move.error, IgopsError)
            message, hint = move.error.message, move.error.hint
            assert message.startswith(
                f"creating replication slot igops_move_{move_id}_changes on main (db1) waited 6 s for 2 transactions "
                f'open there: pid {pid} (postgres@postgres, application "nightly report"'
            )
            assert "; prepared transaction 'forgotten by the manager' (postgres@postgres, prepared " in message
            assert hint == (
                f"on db1: SELECT pg_terminate_backend({pid}); ROLLBACK PREPARED 'forgotten by the manager' in "
                f"database postgres (or wait for them to end), then `igops shard move --resume {move_id}`"
            )
            assert warnings(said, move_id, "_changes")
            status, step_done, _ = clusters.journal(move_id)
            assert (status, step_done) == ("active", "caught_up")
            assert slots(clusters) == [f"igops_move_{move_id}"]  # the move's own, which the resume streams from
            assert clusters.schemas("db1") == {"insta0"} and clusters.placement() == "main"
        finally:
            for connection, _ in opened:
                connection.close()
            with clusters.session("db1", "postgres") as cursor:
                cursor.execute("ROLLBACK PREPARED 'forgotten by the manager'")
    resume_finishes(clusters, move_id)


@needs_postgres
def test_a_transaction_that_ends_within_the_limit_is_named_and_the_move_goes_on(clusters, monkeypatch):
    monkeypatch.setattr(shard_slot_wait, "WARN_AFTER_S", 1.0)
    blocker, pid = open_transaction(clusters)
    ends = threading.Timer(3.0, blocker.rollback)
    said = Said()
    try:
        ends.start()
        move = start(clusters, said)
        assert move.done_within(MOVE_LIMIT_S)
        assert move.error is None and move.result.status == "done" and clusters.placement() == "pg2"
        move_id = last_move_id(clusters)
        said_while_waiting = warnings(said, move_id)
        assert len(said_while_waiting) == 1 and f": pid {pid} (" in said_while_waiting[0]
        assert said_while_waiting[0].endswith(
            "; igops gives up at 5 min (a logical slot is made once every transaction that had written when its "
            "creation began has ended)"
        )
    finally:
        ends.cancel()
        blocker.close()


@needs_postgres
def test_when_the_cancel_cannot_be_sent_the_creation_is_cut_off_in_time(clusters, shortened, monkeypatch):
    """The source refuses new connections (all taken, say): the watch can neither read nor cancel."""

    def refused(*args, **kwargs):
        raise IgopsError("no member of Postgres cluster main accepts writes (db1: too many clients already)")

    connect = shard_slot_wait.connect
    monkeypatch.setattr(shard_slot_wait, "connect", refused)
    blocker, pid = open_transaction(clusters)
    said = Said()
    try:
        started = time.monotonic()
        move = start(clusters, said)
        assert move.done_within(MOVE_LIMIT_S)
        assert time.monotonic() - started < LIMIT_S + 30
        move_id = last_move_id(clusters)
        assert isinstance(move.error, IgopsError)
        assert move.error.message == (
            f"creating replication slot igops_move_{move_id} on main (db1) waited 6 s for transactions open there, "
            "none of which could be named; db1 did not take the cancel: igops cut its connection, and the slot may "
            "be made once what it waits for ends (a --resume or --abort drops it)"
        )
        assert move.error.hint.startswith("look on db1 for a transaction open since before the move's step began")
        assert all(
            line.endswith(
                "could not be read (no member of Postgres cluster main accepts writes (db1: too many "
                "clients already)); igops gives up at 6 s (a logical slot is made once every transaction "
                "that had written when its creation began has ended)"
            )
            for line in warnings(said, move_id)
        )
    finally:
        blocker.close()
    monkeypatch.setattr(shard_slot_wait, "connect", connect)
    resume_finishes(clusters, move_id)
    assert slots(clusters) == []


@needs_postgres
def test_a_read_only_transaction_holds_no_slot_and_is_not_named(clusters, monkeypatch):
    monkeypatch.setattr(shard_slot_wait, "WARN_AFTER_S", 0.0)
    report = clusters.connect("db1", "instagram")
    report.autocommit = False
    report.set_session(isolation_level="REPEATABLE READ", readonly=True)
    with report.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_class")  # its snapshot held (backend_xmin), no transaction id
    said = Said()
    try:
        move = start(clusters, said)
        assert move.done_within(MOVE_LIMIT_S)
        assert move.error is None and move.result.status == "done"
        assert not any(f"pid {report.get_backend_pid()} " in line for line in said.lines)
    finally:
        report.close()


# --- the logic alone ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "shown"),
    [
        ("SELECT txid_current(), 'hunter2' AS note", "SELECT txid_current(), ? AS note"),
        ("ALTER ROLE app PASSWORD 'it''s a secret'", "ALTER ROLE app PASSWORD ?"),
        ("SELECT E'a\\'b', $$body$$, $fn$ x $fn$, B'101', X'1f', U&'d\\0061t'", "SELECT ?, ?, ?, ?, ?, ?"),
        (
            "UPDATE t1 SET v = 1.5e3, w = .5 WHERE id = $1 AND x = -42",
            "UPDATE t1 SET v = ?, w = ? WHERE id = $1 AND x = -?",
        ),
        ('SELECT "it\'s" FROM "quote""d"', 'SELECT "it\'s" FROM "quote""d"'),
        ("SELECT 1 -- card 4111\n /* pin 1234 */ FROM\n\n  x", "SELECT ? FROM x"),
        ("INSERT INTO users VALUES ('cut short by track_activity_query_si", "INSERT INTO users VALUES (?"),
        ("SELECT " + "a, " * 40 + "b", "SELECT " + ("a, " * 40)[:53] + "…"),
    ],
)
def test_a_statement_is_shown_without_its_constants_and_cut_short(query, shown):
    assert statement_shape(query) == shown
