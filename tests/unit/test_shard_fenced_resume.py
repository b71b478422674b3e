"""A move found with its source fenced and its map not switched: a resume switches the map only
while the target still has its copy, and an abort un-fences the source before it drops that
copy, so an abort cut off half-way leaves the shard writable where the map places it."""

import socket
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from igops import shard_cutover, shard_move, shard_switch, shards
from igops.errors import IgopsError, RefusedError
from igops.output import Reporter
from igops.shard_move_session import MoveSession

SCHEMA, FENCED, SLOT = "insta5", "insta5_moved_12", "igops_move_12"


class Server:
    """One cluster's primary, as far as a move's steps look: its schemas, subscriptions (each with
    whether it is attached to its slot), replication slots and publications, and its WAL as far
    as the waits read it (`applies`: whether a subscription here applies what it is sent;
    `flush_polls`: how many reads of the flush position come before it has flushed, None for
    never). Every statement run is logged as (name, sql)."""

    def __init__(self, name, log, schemas=(), subscriptions=None, slots=(), publications=()):
        self.name = name
        self.log = log
        self.schemas = set(schemas)
        self.subscriptions = dict(subscriptions or {})
        self.slots = set(slots)
        self.publications = set(publications)
        self.applies = True
        self.flush_polls = 0
        self.marks = 0
        self.rows = []
        self.settings = {}
        self.sockets = socket.socketpair()  # as over a Unix socket: no TCP options to set

    closed = False

    def fileno(self):
        return self.sockets[0].fileno()

    def cursor(self):
        return Cursor(self)

    def close(self):
        pass


class Cursor:
    def __init__(self, server):
        self.server = server
        self.rows = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, statement, params=()):
        server = self.server
        text = statement if isinstance(statement, str) else repr(statement)
        server.log.append((server.name, text))
        self.rows = []
        if text.startswith("SELECT current_setting("):  # a deadline set for a while (igops.postgres_deadline)
            self.rows = [tuple(server.settings.get(name, "0") for name in params)]
        elif text.startswith("SELECT set_config("):
            server.settings.update(zip(params[::2], params[1::2], strict=True))
            self.rows = [tuple(params[1::2])]
        elif "FROM pg_namespace WHERE nspname = ANY" in text:
            self.rows = [(name,) for name in params[0] if name in server.schemas]
        elif "EXISTS (SELECT 1 FROM pg_namespace" in text:
            schema, subscription = params
            self.rows = [(schema in server.schemas, server.subscriptions.get(subscription, False))]
        elif "RENAME TO" in text:
            server.schemas.discard(FENCED)
            server.schemas.add(SCHEMA)
        elif "pg_logical_emit_message" in text:
            server.marks += 1
            self.rows = [(f"0/{0x5000000 + server.marks:X}",)]
        elif "latest_end_lsn >=" in text:
            self.rows = [(server.applies,)]
        elif "pg_current_wal_flush_lsn() >=" in text:
            flushed = server.flush_polls is not None and server.flush_polls <= 0
            if server.flush_polls:
                server.flush_polls -= 1
            self.rows = [(flushed,)]
        elif "FROM pg_subscription WHERE subname" in text:
            self.rows = [(1,)] if params[0] in server.subscriptions else []
        elif "DROP SUBSCRIPTION" in text:
            server.subscriptions.pop(SLOT, None)
        elif "DROP SCHEMA IF EXISTS" in text:
            server.schemas.discard(SCHEMA)
        elif "SELECT active_pid FROM pg_replication_slots" in text:
            self.rows = [(None,)] if params[0] in server.slots else []
        elif "pg_drop_replication_slot" in text:
            server.slots.discard(params[0])
        elif "FROM pg_publication WHERE pubname" in text:
            self.rows = [(1,)] if params[0] in server.publications else []
        elif "DROP PUBLICATION" in text:
            server.publications.discard(SLOT)

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def fetchall(self):
        return self.rows


def move_plan():
    return shards.MovePlan(5, SCHEMA, "main", "pg2", "db1", "db3", "instagram", [], 1 << 20, 12, "verified")


def fenced_session(target):
    fleet = SimpleNamespace(model=SimpleNamespace(postgres=SimpleNamespace(database="instagram")))
    session = MoveSession(fleet, move_plan(), Reporter(), None)
    session._source = Server("main", [], schemas={FENCED})
    session._target = target
    return session


@pytest.fixture
def flips(monkeypatch):
    flipped = []
    monkeypatch.setattr(shard_cutover, "FENCED_CATCH_UP_S", 0.05)
    monkeypatch.setattr(shard_switch, "flip_map", lambda session, lsn: flipped.append(lsn) or 8)
    return flipped


@pytest.mark.parametrize(
    ("schemas", "subscriptions", "missing"),
    [
        ((), {}, f"no schema {SCHEMA}, no subscription {SLOT}"),  # the abort's first step ran
        ({SCHEMA}, {}, f"no subscription {SLOT}"),  # cut off between the two drops
        ({SCHEMA}, {SLOT: False}, f"no subscription {SLOT}"),  # cut off inside drop_subscription
    ],
)
def test_a_resume_refuses_to_switch_the_map_to_a_target_whose_copy_an_abort_dropped(
    flips, schemas, subscriptions, missing
):
    target = Server("pg2", [], schemas=schemas, subscriptions=subscriptions)
    with pytest.raises(RefusedError) as refused:
        shard_cutover.CutOver(fenced_session(target)).switch()
    assert flips == []
    assert missing in refused.value.message
    assert "igops shard move --abort 12" in refused.value.hint


def test_a_resume_switches_the_map_when_the_target_still_has_its_copy(flips):
    target = Server("pg2", [], schemas={SCHEMA}, subscriptions={SLOT: True})
    assert shard_cutover.CutOver(fenced_session(target)).switch() == "shard map version 8"
    assert flips == ["0/5000001"]  # the mark written on the source, which the cleanup waits for


def test_a_resume_switches_the_map_only_once_the_target_has_flushed_past_a_mark_written_then(flips):
    """The igops that fenced saw the target apply everything, but the target may have restarted
    since and lost what it had not flushed (its subscription commits asynchronously)."""
    target = Server("pg2", [], schemas={SCHEMA}, subscriptions={SLOT: True})
    target.flush_polls = 3
    session = fenced_session(target)
    session._source.log = target.log  # one log, to see the order across both servers
    assert shard_cutover.CutOver(session).switch() == "shard map version 8"
    statements = [text for _, text in target.log]
    applied = next(i for i, text in enumerate(statements) if "latest_end_lsn" in text)
    own_commit = next(i for i, (name, text) in enumerate(target.log) if name == "pg2" and "emit_message" in text)
    flushed = [i for i, text in enumerate(statements) if "pg_current_wal_flush_lsn" in text]
    assert applied < own_commit < flushed[0] and len(flushed) == 4  # three reads before it had flushed
    assert flips == ["0/5000001"]


@pytest.mark.parametrize("stuck", ["apply", "flush"])
def test_a_resume_that_finds_the_target_behind_leaves_the_map_and_says_how_to_go_on(flips, stuck):
    target = Server("pg2", [], schemas={SCHEMA}, subscriptions={SLOT: True})
    if stuck == "apply":  # its subscription not running again yet, say
        target.applies = False
    else:
        target.flush_polls = None
    with pytest.raises(IgopsError) as failed:
        shard_cutover.CutOver(fenced_session(target)).switch()
    assert flips == []
    assert "has not applied and flushed" in failed.value.message and "unavailable" in failed.value.message
    assert "--resume 12" in failed.value.hint and "--abort 12 un-fences main" in failed.value.hint


def test_abort_un_fences_the_source_before_dropping_the_target_copy(monkeypatch):
    log = []
    servers = {
        "main": Server("main", log, schemas={FENCED}),
        "pg2": Server("pg2", log, schemas={SCHEMA}, subscriptions={SLOT: True}),
    }
    abort = shards.AbortPlan(12, 5, SCHEMA, "main", "pg2", "verified", SLOT, FENCED)

    @contextmanager
    def primary_connection(fleet, cluster, database, autocommit, purpose, deadline=None):
        yield servers[cluster]

    def killed(connection, name):  # the abort dies while dropping the target's subscription
        raise KeyboardInterrupt

    journal = SimpleNamespace(hold_shard=lambda shard: None, finish=lambda *a, **k: log.append(("journal", "finish")))
    monkeypatch.setattr(shard_move, "directory_connection", lambda fleet, **kwargs: SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(shard_move, "Journal", lambda directory: journal)
    monkeypatch.setattr(shard_move, "plan_abort", lambda fleet, move_id: abort)
    monkeypatch.setattr(shard_move, "primary_connection", primary_connection)
    monkeypatch.setattr(shard_move, "drop_subscription", killed)
    fleet = SimpleNamespace(model=SimpleNamespace(postgres=SimpleNamespace(database="instagram")))

    with pytest.raises(KeyboardInterrupt):
        shard_move.abort_move(fleet, abort, Reporter())
    assert servers["main"].schemas == {SCHEMA}  # writable again where the map places the shard
    assert servers["pg2"].schemas == {SCHEMA}
    assert ("journal", "finish") not in log
    assert abort.steps()[0].startswith(f"on main: if the cut-over fenced it, rename {FENCED} back")
