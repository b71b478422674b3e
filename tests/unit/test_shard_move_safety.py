"""What keeps a move from hurting the clusters it touches: an abort whose target is down still
drops the source's slot and publication (else the slot holds the source's WAL, and every shard
there, hostage to the target) and says what it left; a move refuses a source whose slots may
hold WAL without bound; the map names the target only once the target has flushed what it
applied; and only a move still active in the journal switches the map."""

from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from igops import shard_cutover, shard_move, shard_switch, shards
from igops.errors import IgopsError, RefusedError
from igops.output import Reporter
from igops.shard_move_session import MoveSession
from tests.unit.test_shard_fenced_resume import FENCED, SCHEMA, SLOT, Server, move_plan

FLEET = SimpleNamespace(model=SimpleNamespace(postgres=SimpleNamespace(database="instagram")))


class Steps(Reporter):
    """The steps run, as the operator sees them: title, status and detail."""

    def __init__(self):
        self.ran = []

    @contextmanager
    def step(self, title):
        record = SimpleNamespace(title=title, status="running", detail=None)
        self.ran.append(record)
        try:
            yield record
        except BaseException:
            record.status = "failed"
            raise
        if record.status == "running":
            record.status = "ok"


class FakeJournal:
    def __init__(self, log):
        self.log = log
        self.error = None

    def hold_shard(self, shard):
        pass

    def finish(self, move_id, status, step=None, error=None):
        self.log.append(("journal", f"finish {move_id} {status}"))

    def fail(self, move_id, error):
        self.error = error
        self.log.append(("journal", f"fail {move_id}"))

    def get(self, move_id):
        return SimpleNamespace(id=move_id)


@pytest.fixture
def lab(monkeypatch):
    """main, the source, with the move's slot and publication; pg2, the target, with its copy and
    subscription, down until `up` is set."""
    log = []
    servers = {
        "main": Server("main", log, schemas={SCHEMA}, slots={SLOT}, publications={SLOT}),
        "pg2": Server("pg2", log, schemas={SCHEMA}, subscriptions={SLOT: True}),
    }
    state = SimpleNamespace(servers=servers, log=log, up={"main"}, journal=FakeJournal(log))
    abort = shards.AbortPlan(12, 5, SCHEMA, "main", "pg2", "caught_up", SLOT, FENCED)

    @contextmanager
    def primary_connection(fleet, cluster, database, autocommit, purpose, deadline=None):
        if cluster not in state.up:
            raise IgopsError(
                f"no member of Postgres cluster {cluster} accepts writes (db3: connection refused; db4: a standby)",
                f"`igops pg status {cluster}` shows the cluster",
            )
        yield servers[cluster]

    monkeypatch.setattr(shard_move, "directory_connection", lambda fleet, **kwargs: SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(shard_move, "Journal", lambda directory: state.journal)
    monkeypatch.setattr(shard_move, "plan_abort", lambda fleet, move_id: abort)
    monkeypatch.setattr(shard_move, "primary_connection", primary_connection)
    state.abort = abort
    return state


def test_an_abort_whose_target_is_down_still_drops_the_sources_slot_and_says_what_is_left(lab):
    steps = Steps()
    with pytest.raises(IgopsError) as failed:
        shard_move.abort_move(FLEET, lab.abort, steps)

    source, target = lab.servers["main"], lab.servers["pg2"]
    assert source.slots == set() and source.publications == set()  # no WAL held for the target
    assert source.schemas == {SCHEMA}
    assert target.subscriptions == {SLOT: True} and target.schemas == {SCHEMA}  # untouched: it was down
    assert f"pg2 may still hold subscription {SLOT} and the partial copy (schema {SCHEMA})" in failed.value.message
    assert "no member of Postgres cluster pg2 accepts writes" in failed.value.message
    assert f"slot and publication {SLOT} are dropped" in failed.value.message
    assert "`igops shard move --abort 12` again" in failed.value.hint
    # The move stays unfinished, failed with that, so that --abort runs again.
    assert ("journal", "fail 12") in lab.log and ("journal", "finish 12 aborted") not in lab.log
    assert lab.journal.error == failed.value.one_line()
    # The plan shown (and its dry run) is what ran, step for step.
    assert [step.title for step in steps.ran] == lab.abort.steps()
    assert [step.status for step in steps.ran] == ["ok", "failed", "ok", "failed"]
    assert steps.ran[1].detail.startswith("left for another --abort 12: no member of Postgres cluster pg2")
    assert steps.ran[2].detail == "slot and publication dropped"

    lab.up.add("pg2")  # back: the same abort again finishes it
    again = Steps()
    assert shard_move.abort_move(FLEET, lab.abort, again).id == 12
    assert target.subscriptions == {} and target.schemas == set()
    assert [step.status for step in again.ran] == ["ok"] * 4
    assert again.ran[2].detail == "no slot or publication left"
    assert lab.log[-1] == ("journal", "finish 12 aborted")


def test_an_abort_drops_the_targets_subscription_before_the_slot_it_reads(lab):
    lab.up.add("pg2")
    shard_move.abort_move(FLEET, lab.abort, Steps())
    order = [(name, text) for name, text in lab.log if "DROP SUBSCRIPTION" in text or "drop_replication_slot" in text]
    assert [name for name, _ in order] == ["pg2", "main"]
    assert lab.log[-1] == ("journal", "finish 12 aborted")


def test_an_abort_before_the_copy_names_only_the_partial_copy():
    early = shards.AbortPlan(12, 5, SCHEMA, "main", "pg2", "published", SLOT, FENCED)
    assert early.left_on_target() == [f"the partial copy (schema {SCHEMA})"]


@pytest.mark.parametrize(
    ("keep", "refused"), [("-1", True), ("192MB", False), ("0", False)], ids=["unbounded", "192MB", "zero"]
)
def test_a_move_refuses_a_source_whose_slots_may_hold_wal_without_bound(keep, refused):
    class Settings:
        def execute(self, statement, params=None):
            assert "max_slot_wal_keep_size" in statement

        def fetchone(self):
            return ("logical", 10, 2, 10, 2, keep)

    if refused:
        with pytest.raises(RefusedError) as refusal:
            shard_move._check_replication_capacity(Settings(), "main")
        assert "max_slot_wal_keep_size = -1" in refusal.value.message
        assert "pg_reload_conf()" in refusal.value.hint
    else:
        shard_move._check_replication_capacity(Settings(), "main")


@pytest.mark.parametrize(
    ("step", "slots", "publications", "why"),
    [
        ("caught_up", {SLOT}, {SLOT}, None),
        ("caught_up", set(), {SLOT}, f"slot {SLOT} on main is gone"),
        ("caught_up", set(), set(), f"publication {SLOT} is gone from main"),  # an unfinished abort
        ("published", set(), set(), f"publication {SLOT} is gone from main"),
        ("published", set(), {SLOT}, None),  # no slot yet: the copy makes it
        ("target_ready", set(), set(), None),  # not published yet: the resume publishes
    ],
)
def test_a_resume_publishes_and_copies_again_when_the_source_lost_its_publication_or_slot(
    monkeypatch, step, slots, publications, why
):
    source = Server("main", [], slots=slots, publications=publications)

    @contextmanager
    def primary_connection(fleet, cluster, database, autocommit, purpose):
        yield source

    monkeypatch.setattr(shard_move, "primary_connection", primary_connection)
    monkeypatch.setattr(shard_move, "slot_usable", lambda cursor, slot: True if slot in source.slots else None)
    record = SimpleNamespace(source="main", slot=SLOT)
    lost = shard_move._replication_lost(FLEET, record, step)
    assert (lost is None) if why is None else (lost or "").startswith(why)


# The cut-over: the map is staged (and the source fenced) only once the target has flushed.


class Connection(Server):
    """The cut-over's own connections (the source's lock session, the directory): commits and
    rollbacks logged too."""

    def commit(self):
        self.log.append((self.name, "COMMIT"))

    def rollback(self):
        self.log.append((self.name, "ROLLBACK"))

    closed = False


@pytest.fixture
def cut_over(monkeypatch):
    log = []
    session = MoveSession(FLEET, move_plan(), Reporter(), None)
    session._source = Server("main", log, schemas={SCHEMA})
    session._target = Server("pg2", log, schemas={SCHEMA}, subscriptions={SLOT: True})
    locker = Connection("locker", log)
    staged = []

    def stage(session, directory, lsn, watchdog):
        log.append(("directory", f"stage map flip at {lsn}"))
        staged.append(lsn)
        return 8

    monkeypatch.setattr(shard_cutover, "CUTOVER_CATCH_UP_S", 0.05)
    monkeypatch.setattr(shard_cutover, "connect", lambda *args, **kwargs: locker)
    monkeypatch.setattr(shard_cutover, "directory_connection", lambda *args, **kwargs: Connection("directory", log))
    monkeypatch.setattr(shard_cutover, "tables_of", lambda cursor, schema: ["users"])
    monkeypatch.setattr(shard_cutover, "describe_schema", lambda cursor, schema: SimpleNamespace(sequences=[]))
    monkeypatch.setattr(shard_cutover, "lock_tables", lambda cursor, schema, tables: log.append(("locker", "LOCK")))
    monkeypatch.setattr(shard_cutover, "sequence_values", lambda cursor, schema, sequences: {})
    monkeypatch.setattr(shard_cutover, "_check_clock_skew", lambda session: None)
    monkeypatch.setattr(shard_cutover, "_wait_for_target_clock", lambda session: None)
    monkeypatch.setattr(shard_cutover, "stage_in_hold", stage)
    monkeypatch.setattr(shard_cutover, "commit_map", lambda directory, watchdog: None)
    monkeypatch.setattr(shard_cutover, "catch_up", lambda session: log.append(("catch_up", "")))
    cut = shard_cutover.CutOver(session)
    cut.changes = SimpleNamespace(
        drain=lambda upto=None: 0, compare=lambda cursors, schemas: (3, []), close=lambda: None
    )
    return SimpleNamespace(cut=cut, log=log, target=session._target, staged=staged)


def test_the_cut_over_switches_the_map_only_after_the_target_flushed_what_it_applied(cut_over):
    cut_over.target.flush_polls = 2
    detail = cut_over.cut.switch()
    assert "shard map version 8" in detail and cut_over.staged == ["0/5000001"]
    texts = [f"{name}: {text}" for name, text in cut_over.log]

    def first(fragment):
        return next(i for i, text in enumerate(texts) if fragment in text)

    flush_reads = [i for i, text in enumerate(texts) if "pg_current_wal_flush_lsn" in text]
    assert first("latest_end_lsn") < first("pg2: SELECT pg_logical_emit_message") < flush_reads[0]
    assert len(flush_reads) == 3  # two reads before the target had flushed, then the one that saw it
    assert flush_reads[-1] < first("RENAME TO") < first("stage map flip") < first("locker: COMMIT")


def test_a_target_that_does_not_flush_in_time_releases_the_writes_and_switches_nothing(cut_over):
    cut_over.target.flush_polls = None
    with pytest.raises(IgopsError) as gave_up:
        cut_over.cut.switch()
    assert "cut-over gave up after 3 attempts" in gave_up.value.message
    assert "applied the source's WAL up to" in gave_up.value.message and "did not flush it" in gave_up.value.message
    assert "--resume 12" in gave_up.value.hint
    texts = [f"{name}: {text}" for name, text in cut_over.log]
    assert cut_over.staged == [] and not any("RENAME TO" in text for text in texts)
    held = [text for text in texts if text in ("locker: LOCK", "locker: ROLLBACK", "locker: COMMIT")]
    # Each attempt: the reads before the lock ended, the lock, then released (never committed).
    assert held == ["locker: ROLLBACK", "locker: LOCK", "locker: ROLLBACK"] * 3
    assert texts.count("catch_up: ") == 2


# Only a move still active in the journal switches the map.


class Directory:
    def __init__(self, moves_updated):
        self.moves_updated = moves_updated
        self.statements = []

    def cursor(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, statement, params=()):
        self.statements.append((statement, params))
        self.rowcount = self.moves_updated if "UPDATE shard_moves" in statement else 1
        self.row = (8,) if "RETURNING version" in statement else None

    def fetchone(self):
        return self.row


@pytest.mark.parametrize("updated", [1, 0], ids=["active", "aborted-meanwhile"])
def test_the_map_flip_requires_the_move_to_be_still_active(updated):
    session = SimpleNamespace(plan=move_plan())
    directory = Directory(updated)
    if updated:
        assert shard_switch.stage_map_flip(session, directory, "0/5000001") == 8
    else:
        with pytest.raises(RefusedError) as refused:
            shard_switch.stage_map_flip(session, directory, "0/5000001")
        assert "move 12 is no longer active" in refused.value.message and "not switched" in refused.value.message
    statement, params = directory.statements[-1]
    assert "WHERE id = %s AND status = 'active'" in statement and params[-1] == 12


def test_a_map_flip_retried_after_the_fence_stops_at_once_when_the_move_was_aborted(monkeypatch):

    tries = []

    def refused(session, lsn):
        tries.append(lsn)
        raise RefusedError("move 12 is no longer active in the journal")

    monkeypatch.setattr(shard_switch, "flip_map", refused)
    monkeypatch.setattr(shard_switch.time, "sleep", lambda seconds: None)
    with pytest.raises(RefusedError):
        shard_switch.switch_map(
            SimpleNamespace(plan=move_plan(), reporter=Reporter()),
            "0/5000001",
            "server closed the connection unexpectedly",
        )
    assert tries == ["0/5000001"]


def test_a_stale_movers_failure_leaves_a_finished_moves_journal_alone():
    from igops.shard_journal import Journal

    statements = []
    cursor = SimpleNamespace(execute=lambda statement, params: statements.append((repr(statement), params)))

    class Cursor:
        def __enter__(self):
            return cursor

        def __exit__(self, *exc):
            return False

    connection = SimpleNamespace(cursor=Cursor)
    Journal(connection).fail(12, "move 12 is no longer active in the journal")
    Journal(connection).update(12, error=None)
    (failed, failed_params), (updated, _) = statements
    assert "AND status = 'active'" in failed and failed_params[-1] == 12
    assert "AND status = 'active'" not in updated
