"""The operation engine on its local backend: leases by resource, the write-ahead journal,
running versus interrupted (a real SIGKILLed process), --wait, and what an abort would run.
The etcd backend is tested against the lab's etcd (tests/integration/test_operations_etcd.py)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC

import pytest

from igops import inventory, process_identity
from igops.errors import ExitCode
from igops.operations import conflicts, engine, journal, steps
from igops.operations.engine import OperationSpec
from igops.output import Reporter
from tests.unit.inventories import unit_inventory

HOSTS = [
    ("db1", "127.0.99.1", "postgres"),
    ("db2", "127.0.99.2", "postgres"),
    ("db3", "127.0.99.3", "postgres"),
    ("redis1", "127.0.99.4", "redis"),
    ("app1", "127.0.99.5", "app"),
]
SECTIONS = (
    '[postgres.clusters.main]\nprimary = "db1"\nstandbys = ["db2"]\n'
    '[postgres.clusters.shards2]\nprimary = "db3"\nstandbys = []\n[redis]\nmaster = "redis1"\n'
)


@pytest.fixture
def fleet(tmp_path):
    return inventory.load_file(unit_inventory(tmp_path, HOSTS, sections=SECTIONS))


def spec(kind="pg-switchover", resources=None, steps_=("pause", "stop", "promote")):
    return OperationSpec(
        kind,
        f"{kind} test",
        ["main"],
        resources or [conflicts.pg_cluster("main")],
        list(steps_),
        {"cluster": "main", "to": "db2"},
    )


def records(fleet):
    return journal.LocalJournal(fleet.state_dir).records()


def test_an_operation_journals_each_step_before_and_after_it_and_audits_start_and_end(fleet):
    def action(operation):
        for title in ("pause", "stop"):
            with operation.reporter.step(title) as record:
                record.detail = f"{title} done"
        return "result"

    assert engine.perform(fleet, spec(), action, Reporter(), reason="INC-7") == "result"
    [record] = records(fleet)
    assert record["kind"] == "pg-switchover" and record["result"] == "ok" and record["exit_code"] == 0
    assert record["reason"] == "INC-7" and record["plan"] == ["pause", "stop", "promote"]
    # Which process ran it, beyond its host and pid: what a reader judges it gone by.
    assert record["pid"] == os.getpid() and {key: record[key] for key in process_identity.FIELDS} == (
        process_identity.own()
    )
    entries = journal.LocalJournal(fleet.state_dir).entries(record["id"])
    assert [(e["event"], e.get("title")) for e in entries] == [
        ("begin", "pg-switchover test"),
        ("intent", "pause"),
        ("result", "pause"),
        ("intent", "stop"),
        ("result", "stop"),
        ("end", None),
    ]
    assert entries[2]["detail"] == "pause done" and entries[2]["duration_ms"] >= 0
    audit = [json.loads(line) for line in (fleet.state_dir / "audit.log").read_text().splitlines()]
    assert [(a["result"], a["exit_code"], a["operation"]) for a in audit] == [
        ("started", None, record["id"]),
        ("ok", 0, record["id"]),
    ]


def test_a_step_costs_one_journal_write_its_result_going_out_with_the_next_write(fleet):
    """One store round per step (one Raft round with etcd): a step's result goes out with the
    next step's intent, or with the end; the entries keep their order."""
    writes = []

    def action(operation):
        real = operation.store.append

        def counted(op_id, entries, record=None):
            writes.append([(e["event"], e.get("title")) for e in entries])
            real(op_id, entries, record)

        operation.store.append = counted
        for title in ("pause", "stop", "promote"):
            with operation.reporter.step(title):
                pass

    engine.perform(fleet, spec(), action, Reporter())
    assert writes == [
        [("intent", "pause")],
        [("result", "pause"), ("intent", "stop")],
        [("result", "stop"), ("intent", "promote")],
        [("result", "promote"), ("end", None)],
    ]
    [record] = records(fleet)
    events = [e["event"] for e in journal.LocalJournal(fleet.state_dir).entries(record["id"])]
    assert events == ["begin"] + ["intent", "result"] * 3 + ["end"]


def test_a_failed_operation_ends_failed_with_its_exit_code_and_the_failing_step(fleet):
    from igops.errors import RemoteError

    def action(operation):
        with operation.reporter.step("stop"):
            raise RemoteError("db1 did not stop", "look at its log")

    with pytest.raises(RemoteError):
        engine.perform(fleet, spec(), action, Reporter())
    [record] = records(fleet)
    assert record["result"] == "failed" and record["exit_code"] == int(RemoteError.exit_code)
    assert "db1 did not stop" in record["detail"]
    entries = journal.LocalJournal(fleet.state_dir).entries(record["id"])
    assert [e["status"] for e in entries if e["event"] == "result"] == ["failed"]


def interrupted_record(fleet, store, of: OperationSpec | None = None) -> dict:
    """An operation (`of`, else spec()) cut off in its second step, its record left open as a
    SIGKILL leaves it (test_a_sigkilled_operation_is_interrupted_at_its_step_and_its_lease_is_free
    kills one)."""

    def cut_off(operation):
        with operation.reporter.step("pause"):
            pass
        with operation.reporter.step("stop"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.perform(fleet, of or spec(), cut_off, Reporter())
    record = max(store.records(), key=lambda r: r["started"])
    record.update(ended=None, result=None, exit_code=None, detail=None)
    store.append(record["id"], [], record)
    return record


def failing_undo(operation):
    from igops.errors import RemoteError

    with operation.reporter.step("start db1 again"):
        raise RemoteError("db1 did not start", "look at its log")


def test_an_abort_that_fails_leaves_the_operation_interrupted_for_another_abort(fleet):
    """A failed abort has not undone what it was to undo: the operation stays interrupted (in
    `ops list`, in `igops check`), and an abort run again, once what failed is fixed, ends it."""
    from igops.errors import RemoteError

    store = journal.LocalJournal(fleet.state_dir)
    record = interrupted_record(fleet, store)
    with pytest.raises(RemoteError):
        engine.perform(fleet, spec(), failing_undo, Reporter(), resume={**record, "continued_by": "abort"})
    [still] = store.open_records()
    assert still["id"] == record["id"]
    assert journal.status_of(still, store.alive(still)) == journal.INTERRUPTED
    assert still["abort_failed"]["result"] == "failed" and "db1 did not start" in still["abort_failed"]["detail"]
    assert store.entries(record["id"])[-1]["event"] == "abort-failed"

    def undone(operation):
        with operation.reporter.step("start db1 again"):
            return "undone"

    # A run that continues it clears the failure, until it fails as an abort too.
    again = {**still, "continued_by": "abort"}
    aborted = engine.perform(fleet, spec(), undone, Reporter(), outcome=lambda _: ("aborted", 0), resume=again)
    assert aborted == "undone" and store.open_records() == []
    assert store.record(record["id"])["result"] == "aborted"
    assert store.record(record["id"])["abort_failed"] is None


def test_a_shard_move_killed_before_its_move_began_is_ended_by_an_abort_and_not_resumed(fleet):
    """Nothing of it is in the directory's move journal: resume has nothing to finish and says
    to abort; the abort undoes nothing and ends the operation (before, it refused as well, and the
    operation stayed interrupted until a rerun of the same move superseded it)."""
    from igops import interrupted
    from igops.errors import RefusedError

    store = journal.LocalJournal(fleet.state_dir)
    resources = [conflicts.shard(3), conflicts.pg_cluster("shards2"), conflicts.pg_cluster("main")]
    record = interrupted_record(fleet, store, spec("shard-move", resources, ["copy"]))
    entries = store.entries(record["id"])
    with pytest.raises(RefusedError, match="nothing to resume") as refused:
        interrupted.plan_resume(fleet, record, entries)
    assert f"igops ops abort {record['id']}" in refused.value.hint
    continuation = interrupted.plan_abort(fleet, record, entries)
    assert continuation.spec.steps == [] and sorted(map(tuple, continuation.spec.resources)) == sorted(resources)
    engine.perform(
        fleet,
        continuation.spec,
        lambda operation: continuation.apply(operation.reporter),
        Reporter(),
        outcome=lambda _: ("aborted", 0),
        resume={**record, "continued_by": "abort"},
    )
    assert store.open_records() == [] and store.record(record["id"])["result"] == "aborted"


def test_a_resume_that_fails_ends_the_operation_failed(fleet):
    """As any failed run does: a resume is planned afresh from the live state, and its planner
    rolled back what it could."""
    from igops.errors import RemoteError

    store = journal.LocalJournal(fleet.state_dir)
    record = interrupted_record(fleet, store)
    # Begun by an older igops, whose record did not say which process it ran in.
    older = {**record, "boot_id": None, "pid_namespace": None, "process_start": None}
    with pytest.raises(RemoteError):
        engine.perform(fleet, spec(), failing_undo, Reporter(), resume={**older, "continued_by": "resume"})
    assert store.open_records() == []
    resumed = store.record(record["id"])
    assert resumed["result"] == "failed"
    # The resumer's process is the one the record names now.
    assert {key: resumed[key] for key in process_identity.FIELDS} == process_identity.own()


def holding(fleet, resources, step_title="stop the old primary"):
    """Run an operation in a thread that waits, inside its first step, until released."""
    inside, release = threading.Event(), threading.Event()

    def action(operation):
        with operation.reporter.step(step_title):
            inside.set()
            release.wait(30)

    thread = threading.Thread(
        target=engine.perform, args=(fleet, spec(resources=resources), action, Reporter()), kwargs={"reason": "INC-1"}
    )
    thread.start()
    assert inside.wait(10)
    return thread, release


def test_a_conflict_exits_4_naming_the_holder_its_step_and_reason(fleet):
    thread, release = holding(fleet, [conflicts.pg_cluster("main")])
    try:
        move = OperationSpec(
            "shard-move",
            "move shard 3 into main",
            ["shard 3"],
            [conflicts.shard(3), conflicts.pg_cluster("shards2"), conflicts.pg_cluster("main")],
            ["copy"],
        )
        with pytest.raises(Exception) as refused:
            engine.perform(fleet, move, lambda op: None, Reporter())
        assert refused.value.exit_code == ExitCode.LOCKED
        text = refused.value.message
        assert "pg main is held by pg-switchover" in text and "[1] stop the old primary" in text
        assert "reason: INC-1" in text and f"pid {os.getpid()}" in text
    finally:
        release.set()
        thread.join()
    # Nothing of the refused operation was left behind: no record, no lock.
    assert [r["kind"] for r in records(fleet)] == ["pg-switchover"]


def test_operations_on_other_resources_run_at_once(fleet):
    thread, release = holding(fleet, [conflicts.pg_cluster("main")])
    try:
        other = OperationSpec("pg-switchover", "other cluster", ["shards2"], [conflicts.pg_cluster("shards2")], [])
        assert engine.perform(fleet, other, lambda op: "done", Reporter()) == "done"
    finally:
        release.set()
        thread.join()


def test_wait_takes_the_lease_once_the_holder_ends(fleet):
    thread, release = holding(fleet, [conflicts.pg_cluster("main")])
    threading.Timer(0.5, release.set).start()
    started = time.monotonic()
    assert engine.perform(fleet, spec(), lambda op: "mine", Reporter(), wait=10) == "mine"
    assert 0.4 < time.monotonic() - started < 5
    thread.join()


@pytest.mark.parametrize(
    "first, second",
    [
        (("pg-switchover", "main"), ("pg-failover", "main")),
        (("pg-switchover", "main"), ("shard-move", "into main")),
        (("pg-switchover", "main"), ("snapshot-create", "db2")),
        (("deploy", None), ("deploy-rollback", None)),
        (("redis-switchover", None), ("snapshot-create", "redis1")),
    ],
)
def test_the_conflict_table(fleet, first, second):
    def resources(kind, target):
        if kind.startswith("pg-"):
            return [conflicts.pg_cluster(target)]
        if kind == "shard-move":
            return [conflicts.shard(3), conflicts.pg_cluster("shards2"), conflicts.pg_cluster("main")]
        if kind == "snapshot-create":
            return conflicts.for_host(fleet, target)
        if kind.startswith("redis-"):
            return [conflicts.REDIS]
        return [conflicts.app_server("app1"), conflicts.app_server("app2")]

    assert conflicts.conflicting(resources(*first), resources(*second))


def test_unrelated_operations_do_not_conflict(fleet):
    assert not conflicts.conflicting([conflicts.pg_cluster("main")], conflicts.for_host(fleet, "db3"))
    assert not conflicts.conflicting([conflicts.warm("db2")], conflicts.for_host(fleet, "db2"))
    assert not conflicts.conflicting([conflicts.app_server("app1")], [conflicts.REDIS])
    assert not conflicts.conflicting([conflicts.app_server("app1")], [conflicts.app_server("app2")])


def test_every_kind_is_in_the_table_and_an_unknown_kind_is_a_bug():
    assert {row[0] for row in conflicts.table_rows()} == set(conflicts.KINDS)
    with pytest.raises(ValueError, match="unknown operation kind"):
        OperationSpec("pg-switcheroo", "x", [], [], [])


KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from igops import inventory
    from igops.operations import conflicts, engine
    from igops.operations.engine import OperationSpec
    from igops.output import Reporter
    fleet = inventory.load_file(Path(sys.argv[1]))
    def action(operation):
        with operation.reporter.step("pause"):
            pass
        with operation.reporter.step("stop"):
            print("inside", flush=True)
            time.sleep(60)
    engine.perform(fleet, OperationSpec("pg-switchover", "killed", ["main"], [conflicts.pg_cluster("main")],
                                        ["pause", "stop"], {"cluster": "main", "to": "db2"}), action, Reporter())
""")


def test_resume_or_abort_of_a_superseded_operation_names_the_rerun_that_superseded_it(fleet):
    """The rerun took over what the interrupted run left (its planner finishes or rolls it back;
    a rebuild's rerun puts back the volumes it took out): that one is to resume or abort."""
    from igops import interrupted
    from igops.errors import RefusedError

    store = journal.LocalJournal(fleet.state_dir)
    record = interrupted_record(fleet, store)
    engine.perform(fleet, spec(), lambda operation: "rerun", Reporter())
    superseded = store.record(record["id"])
    [rerun] = [r for r in store.records() if r["id"] != record["id"]]
    assert superseded["superseded_by"] == rerun["id"]
    with pytest.raises(RefusedError, match=f"superseded by {rerun['id']}, a rerun of it") as refused:
        interrupted.refuse_if_alive(store, superseded)
    assert f"igops ops show {rerun['id']}" in refused.value.hint


def test_a_rerun_supersedes_once_it_journaled_its_first_step_not_before(fleet):
    """The rerun's first step carries what it takes over (its undo: an in-place rebuild's put-back
    of the volumes the interrupted run took out). A rerun stopped before that step (refused under
    its lease, killed while it checked the state) took over nothing: the interrupted run stays
    interrupted, for `ops abort` or another rerun."""
    from igops.errors import RefusedError

    store = journal.LocalJournal(fleet.state_dir)
    record = interrupted_record(fleet, store)

    def refused(operation):
        raise RefusedError("the state changed since the plan", "run it again")

    with pytest.raises(RefusedError):
        engine.perform(fleet, spec(), refused, Reporter())
    assert [r["id"] for r in store.open_records()] == [record["id"]]

    def first_step(operation):
        assert store.record(record["id"])["ended"] is None
        with operation.reporter.step("take over"):
            assert store.record(record["id"])["result"] == "superseded"  # once its intent is journaled
        raise KeyboardInterrupt  # killed at once

    with pytest.raises(KeyboardInterrupt):
        engine.perform(fleet, spec(), first_step, Reporter())
    superseded = store.record(record["id"])
    assert superseded["result"] == "superseded" and superseded["superseded_by"] != record["id"]
    [intent] = [e for e in store.entries(superseded["superseded_by"]) if e["event"] == "intent"]
    assert intent["time"] <= superseded["ended"]


def test_a_sigkilled_operation_is_interrupted_at_its_step_and_its_lease_is_free(fleet, tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(fleet.source)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert child.stdout.readline().strip() == "inside"
    store = journal.LocalJournal(fleet.state_dir)
    [record] = store.records()
    assert journal.status_of(record, store.alive(record)) == journal.RUNNING
    assert record["pid"] == child.pid and record["process_start"] == process_identity.process_start(child.pid)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    [record] = store.records()
    assert journal.status_of(record, store.alive(record)) == journal.INTERRUPTED
    assert record["step"]["number"] == 2 and record["step"]["title"] == "stop"
    # The kernel dropped its flocks: the next operation on main gets the lease at once. Another
    # kind on main leaves the interrupted one for a person; a rerun of the same one supersedes it.
    other = OperationSpec("snapshot-create", "db2", ["db2"], conflicts.for_host(fleet, "db2"), [])
    assert engine.perform(fleet, other, lambda op: "snapshot", Reporter()) == "snapshot"
    assert [r["id"] for r in store.open_records()] == [record["id"]]
    assert engine.perform(fleet, spec(), lambda op: "next", Reporter()) == "next"
    assert store.open_records() == []
    superseded = store.record(record["id"])
    assert superseded["result"] == "superseded" and "a rerun that took over" in superseded["detail"]


def test_an_abort_runs_releases_always_and_undos_only_before_the_point_of_no_return():
    pause = steps.Step(
        "pause", "pause", ({"pgb1": ["main"]},), release=steps.Step("resume", "resume", ({"pgb1": ["main"]},))
    )
    stop = steps.Step("stop", "stop", ("db1",), undo=steps.Step("start db1", "start", ("db1",)))
    promote = steps.Step("promote", "promote", ("db2",), point_of_no_return=True)

    def entry(number, step, past=False):
        return {
            "event": "intent",
            "step": number,
            "title": step.title,
            "undo": steps.spec(step.undo),
            "release": steps.spec(step.release),
            "point_of_no_return": past,
        }

    from igops import interrupted

    before = [entry(1, pause), entry(2, stop)]
    to_run, not_undone = interrupted.recovery_steps(before)
    assert [(s.title, s.args) for s in to_run] == [("start db1", ("db1",)), ("resume", ({"pgb1": ["main"]},))]
    assert not_undone == []
    past = [*before, entry(3, promote, past=True)]
    to_run, not_undone = interrupted.recovery_steps(past)
    assert [s.title for s in to_run] == ["resume"]
    assert not_undone == ["[2] stop", "[3] promote"]
    # A promotion found to have completed after the run was cut off rolls forward the same way.
    probe = steps.Step("db2: is it out of recovery?", "promoted", ("db2",))
    cut_off = [*before, {**entry(3, steps.Step("promote", "promote", ("db2",))), "took_effect": steps.spec(probe)}]
    assert interrupted.effect_probes(cut_off) == [("[3] promote", probe)]
    assert interrupted.effect_probes(before) == []
    to_run, not_undone = interrupted.recovery_steps(cut_off, rolled_forward=True)
    assert [s.title for s in to_run] == ["resume"]
    assert not_undone == ["[2] stop", "[3] promote"]


def test_the_operations_check_warns_of_interrupted_and_is_critical_for_overdue_operations():
    from igops.checks.operations import verdict
    from igops.errors import NagiosStatus

    running = {"id": "a", "kind": "pg-switchover", "status": "running", "user": "alice", "host": "bastion1"}
    stopped = {"id": "b", "kind": "deploy", "status": "interrupted", "step": {"number": 3, "title": "drain app1"}}
    assert verdict([], {}, None) == (NagiosStatus.OK, "none running or interrupted")
    assert verdict([running], {}, None)[0] == NagiosStatus.OK
    status, text = verdict([running, stopped], {}, None)
    assert status == NagiosStatus.WARNING and "deploy b interrupted at step 3 (drain app1)" in text
    assert "igops ops resume|abort b" in text
    status, text = verdict([running, stopped], {"a": 1200}, None)
    assert status == NagiosStatus.CRITICAL and "pg-switchover a held 20 min past" in text
    assert verdict([], {}, "etcd: no leader")[0] == NagiosStatus.UNKNOWN
    # An abort that failed left it interrupted: the line says so, and what to run once it is fixed.
    stopped.update(step={"number": 1, "title": "put app1 back"}, abort_failed={"detail": "lb1: nginx -t failed"})
    status, text = verdict([stopped], {}, None)
    assert status == NagiosStatus.WARNING
    assert "deploy b interrupted, its abort failed at step 1 (put app1 back): lb1: nginx -t failed" in text
    assert "(fix that, then igops ops abort b)" in text
    from igops.commands.ops import list_row

    assert list_row(stopped)[3] == "interrupted (its abort failed)"


def test_a_stale_list_says_whether_it_is_a_members_copy_or_this_machines_cache():
    from igops.checks.operations import verdict
    from igops.errors import NagiosStatus
    from igops.operations_view import CACHED, MEMBER_COPY, OperationsView

    member = OperationsView([], "etcd", stale="etcd: no leader", read_at="now", read_from=MEMBER_COPY)
    cached = OperationsView([], "etcd", stale="etcd: refused", read_at="2026-12-06T03:00:00+00:00", read_from=CACHED)
    assert "one etcd member" in member.stale_source() and "may lack the last writes" in member.stale_source()
    assert cached.stale_source() == "the list as last read on this machine, at 2026-12-06T03:00:00+00:00"
    status, text = verdict([], {}, f"{member.stale}; {member.stale_source()}")
    assert status == NagiosStatus.UNKNOWN and text.startswith("coordinator unavailable: etcd: no leader; the list as")


def test_hosts_a_deploy_drained_warn_unless_a_deploy_is_running():
    from igops.checks.operations import rotation_verdict
    from igops.errors import NagiosStatus

    running = {"id": "d1", "kind": "deploy", "status": "running"}
    stopped = {"id": "d2", "kind": "deploy", "status": "interrupted"}
    switchover = {"id": "s", "kind": "pg-switchover", "status": "running"}
    assert rotation_verdict([], [stopped]) == (NagiosStatus.OK, "every app host in rotation")
    assert rotation_verdict(["app2"], [running])[0] == NagiosStatus.OK
    status, text = rotation_verdict(["app2", "app3"], [stopped, switchover])
    assert status == NagiosStatus.WARNING and text.startswith("app2, app3 out of rotation")
    assert "igops ops abort d2 puts back each that passes its health gate" in text
    status, text = rotation_verdict(["app2"], [switchover])
    assert status == NagiosStatus.WARNING and "igops deploy again" in text


def test_an_operation_is_overdue_only_past_its_kinds_expected_duration():
    from datetime import datetime, timedelta

    from igops import operations_view

    now = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
    record = {"kind": "pg-switchover", "status": "running", "started": (now - timedelta(minutes=4)).isoformat()}
    assert operations_view.overdue(record, now) is None
    record["started"] = (now - timedelta(minutes=7)).isoformat()
    assert operations_view.overdue(record, now) == pytest.approx(120)
    assert operations_view.overdue({**record, "status": "interrupted"}, now) is None


def test_the_docs_conflict_table_is_the_codes():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    for kind, leases, expected in conflicts.table_rows():
        assert f"| `{kind}` | {leases} | {expected} |" in text, kind


def test_a_lost_lease_stops_the_next_step_but_not_the_releases(fleet):
    from igops.coordination import LeaseLost

    class Actions:
        def __init__(self):
            self.done = []

        def pause(self):
            self.done.append("pause")

        def stop(self):
            self.done.append("stop")
            operation.held._mark_lost("etcd: lease expired")  # lost while this step works

        def promote(self):
            self.done.append("promote")

        def resume(self):
            self.done.append("resume")

        def start(self):
            self.done.append("start")

    plan = [
        steps.Step("pause", "pause", release=steps.Step("resume", "resume")),
        steps.Step("stop", "stop", undo=steps.Step("start", "start")),
        steps.Step("promote", "promote", point_of_no_return=True),
    ]
    actions = Actions()
    operation = None

    def action(op):
        nonlocal operation
        operation = op
        steps.execute(plan, actions, op.reporter, "hint")

    with pytest.raises(steps.StepFailed) as failed:
        engine.perform(fleet, spec(), action, Reporter())
    assert isinstance(failed.value.__cause__, LeaseLost)
    assert actions.done == ["pause", "stop", "start", "resume"], "never promoted; undone and released"
    [record] = records(fleet)
    assert record["result"] == "failed" and "lease lost: etcd: lease expired" in record["detail"]
    # The promotion never began: nothing journaled says the run passed its point of no return (an
    # abort reading it after a kill in the undo would leave the stop undone).
    intents = [e for e in journal.LocalJournal(fleet.state_dir).entries(record["id"]) if e["event"] == "intent"]
    assert [e["title"] for e in intents] == ["pause", "stop", "start", "resume"]
    assert not any(e.get("point_of_no_return") for e in intents), intents


def test_the_process_knows_when_a_running_operations_lease_is_lost(fleet):
    seen = []

    def action(operation):
        seen.append(engine.lease_lost())
        operation.held._mark_lost("not renewed for 10 s")
        seen.append(engine.lease_lost())

    engine.perform(fleet, spec(), action, Reporter())
    assert seen == [None, "not renewed for 10 s"] and engine.lease_lost() is None


def test_a_journal_that_fails_stops_a_step_but_not_a_recovery_step(fleet):
    """etcd lost mid-operation: the next step never acts, the step that leaves the fleet safe
    runs all the same and says the journal did not record it."""
    done, logged = [], []

    class Logging(Reporter):
        def log(self, message):
            logged.append(message)

    def action(operation):
        def broken(*args, **kwargs):
            raise OSError("etcd: all members unreachable")

        operation.store.append = broken
        try:
            with operation.reporter.step("batch 2/3: app2"):
                done.append("batch 2")
        finally:
            with operation.reporter.recovery(), operation.reporter.step("put app1 back in the load balancer"):
                done.append("put back")

    with pytest.raises(OSError):
        engine.perform(fleet, spec(), action, Logging())
    assert done == ["put back"]
    assert any("did not record this recovery step" in line for line in logged), logged


def test_a_redis_switchover_that_began_promoting_its_target_is_recognised_from_its_journal():
    from igops.interrupted import promoted_target

    promote = {
        "event": "intent",
        "step": 4,
        "title": "redis2: REPLICAOF NO ONE",
        "undo": {"title": "redis2: REPLICAOF redis1 again", "action": "replicate", "args": []},
    }
    pause = {
        "event": "intent",
        "step": 2,
        "title": "redis1: CLIENT PAUSE WRITE",
        "release": {"title": "redis1: CLIENT UNPAUSE", "action": "unpause", "args": []},
    }
    demote = {"event": "intent", "step": 5, "title": "redis1: REPLICAOF redis2", "point_of_no_return": True}
    assert promoted_target([pause, promote])
    assert promoted_target([pause, promote, demote])  # whether the demotion ran, the nodes say
    assert not promoted_target([pause])


def test_a_repmgrd_pause_an_interrupted_run_holds_is_known_from_its_journal_until_an_unpause_ends():
    """A resume plans from the live state, which cannot see a repmgrd pause where repmgrd does not
    run: the journal says the run still holds one, so that the resume unpauses it."""
    from igops.interrupted import REPMGRD_UNPAUSE, unreleased

    unpause = {"title": "repmgrd: unpause it on every member", "action": REPMGRD_UNPAUSE, "args": [{"tuple": ["db1"]}]}
    pause = {"event": "intent", "step": 1, "title": "repmgrd: pause it", "release": unpause}
    paused = {"event": "result", "step": 1, "title": "repmgrd: pause it", "status": "ok"}
    began = {"event": "intent", "step": 18, "title": unpause["title"]}
    failed = {"event": "result", "step": 18, "title": unpause["title"], "status": "failed"}
    ended = {**failed, "status": "ok"}
    [held] = unreleased([pause, paused, began], REPMGRD_UNPAUSE)
    assert (held.title, held.action, held.args) == (unpause["title"], REPMGRD_UNPAUSE, (("db1",),))
    assert unreleased([pause, paused, began, failed], REPMGRD_UNPAUSE) == [held]
    assert unreleased([pause, paused, began, ended], REPMGRD_UNPAUSE) == []
    # A resume journals its own steps under the same id: its unpause ends the hold too.
    assert unreleased([pause, paused, {"event": "resume"}, ended], REPMGRD_UNPAUSE) == []
    assert unreleased([pause, paused], "resume") == []


def test_a_fact_the_run_learns_is_journaled_at_once_and_kept_in_its_record(fleet):
    from igops.interrupted import move_of

    def action(operation):
        operation.reporter.fact(move=41)
        with operation.reporter.step("copy"):
            pass
        operation.reporter.fact(move=42)  # a rebalance's next move

    engine.perform(fleet, spec("shard-rebalance", [conflicts.pg_cluster("main")], ["copy"]), action, Reporter())
    [record] = records(fleet)
    entries = journal.LocalJournal(fleet.state_dir).entries(record["id"])
    assert [(e["event"], e.get("move")) for e in entries if e["event"] == "fact"] == [("fact", 41), ("fact", 42)]
    assert record["facts"] == {"move": 42}
    assert move_of(record, entries) == 42
    # A record from before facts were kept: its journal; a resume of the move: its parameters.
    assert move_of({"params": {}}, entries) == 42
    assert move_of({"params": {"move": 7}}, []) == 7
    assert move_of({"params": {}}, []) is None
    Reporter().fact(move=1)  # a plain reporter keeps nothing, and does not fail


def test_a_failure_whose_state_cannot_be_read_still_fails_with_its_step():
    class Actions:
        def stop(self):
            raise RuntimeError("stop failed")

    def left_behind():
        raise ConnectionError("cluster unreachable")

    with pytest.raises(steps.StepFailed) as failed:
        steps.execute([steps.Step("stop", "stop")], Actions(), Reporter(), "hint", left_behind=left_behind)
    assert failed.value.left_behind == "unknown (ConnectionError: cluster unreachable)"
