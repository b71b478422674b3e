"""A move found with its source fenced and its map not switched: a resume switches the map only
while the target still has its copy, and an abort un-fences the source before it drops that
copy, so an abort cut off half-way leaves the shard writable where the map places it."""

from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from igops import shard_cutover, shard_move, shards
from igops.errors import RefusedError
from igops.output import Reporter
from igops.shard_move_session import MoveSession

SCHEMA, FENCED, SLOT = "insta5", "insta5_moved_12", "igops_move_12"


class Server:
    """One cluster's primary, as far as these steps look: its schemas and subscriptions (each
    with whether it is attached to its slot); every statement run is logged as (name, sql)."""

    def __init__(self, name, log, schemas=(), subscriptions=None):
        self.name = name
        self.log = log
        self.schemas = set(schemas)
        self.subscriptions = dict(subscriptions or {})
        self.rows = []

    def cursor(self):
        return Cursor(self)

    def close(self):
        pass


class Cursor:
    def __init__(self, server):
        self.server = server

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, statement, params=()):
        server = self.server
        text = statement if isinstance(statement, str) else repr(statement)
        server.log.append((server.name, text))
        if "FROM pg_namespace WHERE nspname = ANY" in text:
            self.rows = [(name,) for name in params[0] if name in server.schemas]
        elif "EXISTS (SELECT 1 FROM pg_namespace" in text:
            schema, subscription = params
            self.rows = [(schema in server.schemas, server.subscriptions.get(subscription, False))]
        elif "RENAME TO" in text:
            server.schemas.discard(FENCED)
            server.schemas.add(SCHEMA)

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
    monkeypatch.setattr(shard_cutover, "flushed_position", lambda cursor: "0/5000000")
    monkeypatch.setattr(shard_cutover, "_flip_map", lambda session, lsn: flipped.append(lsn) or 8)
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
    assert flips == ["0/5000000"]


def test_abort_un_fences_the_source_before_dropping_the_target_copy(monkeypatch):
    log = []
    servers = {
        "main": Server("main", log, schemas={FENCED}),
        "pg2": Server("pg2", log, schemas={SCHEMA}, subscriptions={SLOT: True}),
    }
    abort = shards.AbortPlan(12, 5, SCHEMA, "main", "pg2", "verified", SLOT, FENCED)

    @contextmanager
    def primary_connection(fleet, cluster, database, autocommit, purpose):
        yield servers[cluster]

    def killed(connection, name):  # the abort dies while dropping the target's subscription
        raise KeyboardInterrupt

    journal = SimpleNamespace(hold_shard=lambda shard: None, finish=lambda *a, **k: log.append(("journal", "finish")))
    monkeypatch.setattr(shard_move, "directory_connection", lambda fleet, purpose: SimpleNamespace(close=lambda: None))
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
