"""SIGKILL at every step of `igops pg switchover` and `igops redis switchover`, under write
load, on the lab's etcd.

One load run and one ledger serve every kill of a kind; each kill's outcome is asserted on its own:
- within the lease TTL plus the PgBouncer watchdog's deadline, `ops list` shows the operation
  interrupted at the step it died in (the one it last showed, or the next, whose intent is
  journaled before it is shown: a step that takes a millisecond can end before the signal
  lands, and the last step the whole run with it, and then the drill kills again, up to
  KILL_ATTEMPTS times), and PgBouncer is not paused;
- never two writable primaries (Postgres), never an app master that is not a master (Redis);
- no repmgrd pause left behind (Postgres): repmgr keeps one with no deadline;
- `ops resume` or `ops abort` leaves one primary (master) that the app uses and every other
  member following it (after an abort that could not undo a promotion, a rerun of the
  switchover finishes the job, as the abort's output says);
and at the end the ledger shows no acknowledged write lost. Each kind runs once, resuming the
odd steps and aborting the even ones (ODD_STEPS): every step is killed, and each continuation
follows half of them. IGOPS_DRILL_ODD_STEPS=abort runs the other half, so that after a change to
a step or its undo both continuations of every step can be drilled.

An abort can be killed too: one killed as its first undo begins leaves the operation
interrupted, and an abort run again plans the same undos from the journal and puts everything
back.
"""

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest

from igops.errors import ExitCode
from tests.conftest import ROOT
from tests.labtools import wait_for
from tests.reliability.test_failover import (
    HOME_MASTER,
    HOME_PRIMARY,
    IN_FLIGHT_RATE,
    OTHER_MASTER,
    OTHER_PRIMARY,
    Load,
    describe,
    igops,
    pg_state,
    redis_state,
    repmgrd_paused,
    restore_home,
    sign_up_succeeds,
)

pytestmark = pytest.mark.lab


@pytest.fixture
def home(lab):
    """db1 the primary of main and redis1 the master, before and after."""
    restore_home(lab)
    yield lab
    restore_home(lab)


@dataclass(frozen=True)
class Kill:
    shown: int  # the last step the run showed before it died
    pid: int  # its process, as its journal record names it


def killed_at(lab, argv: list[str], number: int, required: bool = True) -> Kill | None:
    """igops with `argv`, SIGKILLed as it begins step `number`: the last step it showed before it
    died (`number`, or a later one: a step that takes a millisecond can end, and the next begin,
    before the signal lands), or None if it never showed step `number` (`required`: it must,
    else a plan line that is a note, not a step, may let the run end first)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "igops",
            "-c",
            str(lab.source),
            *argv,
            "--yes",
            "--reason",
            f"kill drill at step {number}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    printed = []
    try:
        for line in process.stderr:
            printed.append(line)
            if line.startswith(f"[{number}] "):
                process.kill()
                break
    finally:
        process.kill()
        process.wait(timeout=30)
        # What it showed before the signal landed is in the pipe already; a helper it started
        # (a watchdog) may hold the pipe open a while, so the rest is read for at most 2 s.
        rest: list[str] = []
        reader = threading.Thread(target=lambda: rest.extend(process.stderr), daemon=True)
        reader.start()
        reader.join(2)
        printed += list(rest)
    shown = [int(found.group(1)) for line in printed if (found := SHOWN_STEP.match(line))]
    killed = number in shown
    assert killed or not required, "".join(printed)[-3000:]
    return Kill(max(shown), process.pid) if killed else None


# A step's line as a run shows it when the step begins (after its intent is journaled).
SHOWN_STEP = re.compile(r"\[(\d+)\] ")


def landed_in(record: dict, kill: Kill) -> int:
    """The step the journal says a killed run was in: the last one it showed, or the next one,
    whose intent is journaled just before it is shown. Anything else is a journal that lies."""
    landed = record["step"]["number"]
    assert landed in (kill.shown, kill.shown + 1), (kill, record["step"])
    return landed


# How often the drill kills again to land in a step that keeps ending before the signal does.
KILL_ATTEMPTS = 5


def after_kill(lab, kind: str, kill: Kill) -> dict | None:
    """The killed run's record once `igops ops list --all` no longer shows it running (read in
    this process: the drill asks often): interrupted, or ended on its own when its last step
    and its end were done before the signal landed (a few milliseconds: it happens)."""
    from igops import operations_view
    from igops.operations import journal

    records = operations_view.list_operations(lab, include_ended=True).records
    found = [record for record in records if record["kind"] == kind and record.get("pid") == kill.pid]
    return found[-1] if found and found[-1]["status"] != journal.RUNNING else None


def interrupted_run(lab, kind: str, kill: Kill, timeout: float) -> dict | None:
    """The killed run's record once `ops list` shows it interrupted, or None if it finished its
    plan before the signal landed (then it must have ended well)."""
    record = wait_for(partial(after_kill, lab, kind, kill), timeout, interval=0.5)
    assert record, f"step {kill.shown}: still listed as running"
    if record["status"] == "interrupted":
        return record
    assert record["exit_code"] == 0, (kill, record)
    return None


def pg_writable(cluster: dict) -> list[str]:
    return [node["name"] for node in cluster["nodes"] if node["role"] == "primary"]


def pg_healthy(cluster: dict) -> str | None:
    ok = (
        cluster["primary"]
        and not cluster["paused"]
        and not cluster["problems"]
        and all(target == cluster["primary"] for table in cluster["pgbouncer"].values() for target in table.values())
        and all(
            node["streaming_from"] == cluster["primary"]
            for node in cluster["nodes"]
            if node["name"] != cluster["primary"]
        )
    )
    return cluster["primary"] if ok else None


def pg_settles(cluster: dict) -> bool:
    """Whether what a continuation left becomes healthy on its own: the app writes to the one
    primary and every member runs (a member started again streams a few seconds later). A
    promotion an abort could not undo leaves PgBouncer on a stopped member: only a rerun helps."""
    routed = {target for table in cluster["pgbouncer"].values() for target in table.values()}
    return (
        bool(cluster["primary"])
        and routed == {cluster["primary"]}
        and all(node["state"] == "running" for node in cluster["nodes"])
    )


def redis_one_place_to_write(redis: dict) -> bool:
    """The app never has two places to write: a second master (a switchover killed between the
    target's promotion and the old master's demotion) is one the directory never named, and a
    directory naming a node just demoted means writes refused (READONLY), not written twice."""
    masters = [node["name"] for node in redis["nodes"] if node["role"] == "master"]
    return len(masters) <= 1 or redis["app_master"] in masters


def redis_healthy(redis: dict) -> str | None:
    return redis["app_master"] if not redis["problems"] else None


def redis_settles(redis: dict) -> bool:
    """Whether what a continuation left may still become healthy on its own: a replica it
    repointed reports its link up and its lag gone a moment later. Once every node answers and
    every replica's link is up, nothing moves by itself: the app writing to a replica, or a
    second master, is what an abort past the promotion left, and only a switchover changes it
    (a rerun, which its plan accepts only once those links are up)."""
    nodes, app_master = redis["nodes"], redis["app_master"]
    steady = all(node["role"] == "master" or (node["role"] == "replica" and node["link"] == "up") for node in nodes)
    masters = [node["name"] for node in nodes if node["role"] == "master"]
    app_on_a_replica = any(node["name"] == app_master and node["role"] == "replica" for node in nodes)
    return not (steady and (app_on_a_replica or len(masters) > 1))


def steps_planned(lab, *argv: str) -> int:
    """How many steps the dry run of `argv` plans."""
    result, envelope = igops(lab, *argv, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    return len(envelope["plan"]["steps"])


# What the kills at odd steps are continued with; those at even steps get the other. One run per
# kind, not one per way: both ways at every step took four minutes more of the suite.
ODD_STEPS = os.environ.get("IGOPS_DRILL_ODD_STEPS", "resume")
assert ODD_STEPS in ("resume", "abort"), f"IGOPS_DRILL_ODD_STEPS={ODD_STEPS}: resume or abort"


def way_for(number: int) -> str:
    """ops resume or ops abort for the kill at step `number`: ODD_STEPS for the odd ones, the
    other for the even ones."""
    return ODD_STEPS if number % 2 else ("abort" if ODD_STEPS == "resume" else "resume")


def nothing_lost(load, outcomes: list[str]) -> None:
    verified = load.verify()
    print("\n" + "; ".join(outcomes) + f"\nload: {describe(load.report, verified)}")
    assert verified.ok, verified.missing_writes[:5]


@dataclass
class Kind:
    kind: str
    argv: Callable[[str], list[str]]  # the switchover to a target
    current: Callable[[dict], str | None]  # the primary (master) in a state
    home: str
    other: str
    healthy: Callable[[dict], str | None]  # the primary (master), if all is well in a state
    single_writer: Callable[[dict], bool]
    held: Callable[[object], list[str]]  # pauses without a deadline left on members
    settles: Callable[[dict], bool]  # whether what a continuation left gets healthy on its own
    state: Callable[[object], dict]  # reads the state that current, healthy, single_writer and settles judge


KINDS = {
    "pg": Kind(
        "pg-switchover",
        lambda to: ["pg", "switchover", "main", "--to", to],
        lambda main: main["primary"],
        HOME_PRIMARY,
        OTHER_PRIMARY,
        pg_healthy,
        lambda main: len(pg_writable(main)) <= 1,
        lambda lab: [f"repmgrd paused on {n}" for n in (HOME_PRIMARY, OTHER_PRIMARY) if repmgrd_paused(lab, n)],
        pg_settles,
        pg_state,
    ),
    "redis": Kind(
        "redis-switchover",
        lambda to: ["redis", "switchover", "--to", to],
        lambda redis: redis["app_master"],
        HOME_MASTER,
        OTHER_MASTER,
        redis_healthy,
        redis_one_place_to_write,
        lambda lab: [],  # a CLIENT PAUSE ends by its own timeout
        redis_settles,
        redis_state,
    ),
}


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("name", ["pg", "redis"])
def test_a_switchover_killed_at_every_step_is_resumed_or_aborted_and_loses_nothing(home, tmp_path, name):
    lab, kind = home, KINDS[name]
    ttl = lab.model.coordination.lease_ttl
    deadline = lab.model.pgbouncer.watchdog_deadline
    count = steps_planned(lab, *kind.argv(kind.other))
    outcomes = []
    # One load run for every kill of this kind: it must outlast them all.
    with Load(lab, tmp_path, duration=3600, rate=IN_FLIGHT_RATE) as load:
        for number, attempt in (
            (number, attempt) for number in range(1, count + 1) for attempt in range(KILL_ATTEMPTS)
        ):
            if attempt and outcomes[-1].startswith(f"[{number}] "):
                continue  # the kill landed in this step already
            target = kind.other if kind.current(kind.state(lab)) == kind.home else kind.home
            began = time.monotonic()
            kill = killed_at(lab, kind.argv(target), number)
            assert kill is not None
            killed = time.monotonic()
            record = interrupted_run(lab, kind.kind, kill, ttl + deadline + 5)
            if record is None:
                outcomes.append(f"({number}) the run ended before the signal landed")
                continue  # the next attempt switches back, and kills again
            landed = landed_in(record, kill)
            listed = time.monotonic()
            assert wait_for(
                lambda: not pg_state(lab)["paused"], max(0.0, killed + ttl + deadline - time.monotonic()), interval=0.1
            ), f"step {number}: PgBouncer still paused"
            assert kind.single_writer(kind.state(lab)), f"step {number}: two writers"
            checked = time.monotonic()
            way = way_for(landed)
            done, answer = igops(lab, "ops", way, record["id"], "--yes")
            continued = time.monotonic()
            if way == "resume" and done.returncode == ExitCode.REFUSED and "nothing to resume" in done.stderr:
                pass  # killed after its last step acted: it is already where the plan led
            else:
                assert done.returncode == 0, (landed, way, done.stderr[-3000:])
            # What the continuation left, read once: whether it has one writer, is healthy, or settles.
            left = kind.state(lab)
            assert kind.single_writer(left), f"step {landed}: two writers after {way}"
            # A member the continuation started again takes a moment to stream (it retries its
            # upstream every wal_retrieve_retry_interval): a rerun planned before then is refused
            # under the lease, rightly, when the member starts streaming in between. What cannot
            # settle is rerun at once: the app cannot write meanwhile.
            healthy = kind.healthy(left) or (
                kind.settles(left) and wait_for(lambda: kind.healthy(kind.state(lab)), 30, interval=0.1)
            )
            if not healthy:
                # An abort past the promotion could not undo it and said so: a rerun finishes.
                assert way == "abort" and answer["data"]["not_undone"], (number, pg_state(lab), redis_state(lab))
                rerun, _ = igops(lab, *kind.argv(kind.current(kind.state(lab)) or target), "--yes")
                assert rerun.returncode == 0, (number, rerun.stderr[-3000:])
                healthy = wait_for(lambda: kind.healthy(kind.state(lab)), 30, interval=0.1)
                assert healthy, (number, way, pg_state(lab))
            # repmgr keeps a pause with no deadline: whatever ended the run must have lifted it.
            assert not kind.held(lab), f"step {landed}: {kind.held(lab)} still held after {way}"
            assert sign_up_succeeds(lab), f"step {number}: writes do not flow"
            outcomes.append(
                f"[{landed}] {way}: {healthy}; s to kill {killed - began:.1f}, listed "
                f"{listed - killed:.1f}, checked {checked - listed:.1f}, {way} {continued - checked:.1f}, "
                f"healthy {time.monotonic() - continued:.1f}"
            )
        assert load.running
    landings = {int(found.group(1)) for line in outcomes if (found := SHOWN_STEP.match(line))}
    missed = sorted(set(range(1, count + 1)) - landings)
    assert not missed, f"kills never landed inside steps {missed} in {KILL_ATTEMPTS} tries each"
    nothing_lost(load, outcomes)


# The switchover's step that begins once the old primary has stopped (its stop's undo starts it
# again): the wait for the candidate's WAL.
AFTER_THE_STOP = 6


def test_an_abort_killed_in_its_first_undo_is_aborted_again_and_loses_nothing(home, tmp_path):
    """A switchover killed once the old primary has stopped, then its abort killed as its first
    undo (start the old primary again) begins: the operation stays interrupted, an abort run
    again plans from the journal and puts everything back; one writer throughout, nothing lost."""
    lab, kind = home, KINDS["pg"]
    ttl, deadline = lab.model.coordination.lease_ttl, lab.model.pgbouncer.watchdog_deadline
    with Load(lab, tmp_path, duration=600, rate=IN_FLIGHT_RATE) as load:
        _, envelope = igops(lab, *kind.argv(kind.other), "--dry-run")
        assert "clean stop" in envelope["plan"]["steps"][AFTER_THE_STOP - 2], envelope["plan"]["steps"]
        kill = killed_at(lab, kind.argv(kind.other), AFTER_THE_STOP)
        record = interrupted_run(lab, kind.kind, kill, ttl + deadline + 5)
        assert record is not None and landed_in(record, kill) >= AFTER_THE_STOP
        _, envelope = igops(lab, "ops", "abort", record["id"], "--dry-run")
        first_undo = envelope["data"]["plan"][0]
        assert "start" in first_undo, envelope["data"]["plan"]
        aborting = killed_at(lab, ["ops", "abort", record["id"]], 1)
        again = interrupted_run(lab, kind.kind, aborting, ttl + 5)
        assert again is not None and again["id"] == record["id"]
        assert kind.single_writer(kind.state(lab)), "two writers"
        done, answer = igops(lab, "ops", "abort", record["id"], "--yes")
        assert done.returncode == 0, done.stderr[-3000:]
        assert answer["data"]["plan"][0] == first_undo, answer["data"]["plan"]
        assert wait_for(lambda: kind.healthy(kind.state(lab)) == kind.home, 60, interval=0.2), pg_state(lab)
        assert not kind.held(lab) and sign_up_succeeds(lab)
        assert load.running
    nothing_lost(load, [f"switchover killed at [{kill.shown}], its abort at [{aborting.shown}], aborted again"])


def test_the_old_primary_rejoins_after_the_new_one_moved_on_several_segments(home):
    """A switchover killed after its promotion, the new primary's WAL then several segments on
    and checkpointed: the segment the old primary's rejoin starts from is still there (held by
    the slot the switchover reserved before promoting), so `ops resume` rejoins it."""
    from igops import postgres

    lab = home
    result, envelope = igops(lab, "pg", "switchover", "main", "--to", OTHER_PRIMARY, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    titles = envelope["plan"]["steps"]
    number = next(i for i, title in enumerate(titles, 1) if "record it as the primary" in title)
    kill = killed_at(lab, ["pg", "switchover", "main", "--to", OTHER_PRIMARY], number)
    assert kill is not None
    record = wait_for(
        partial(after_kill, lab, "pg-switchover", kill), lab.model.coordination.lease_ttl + 5, interval=0.5
    )
    assert record and record["status"] == "interrupted", record
    landed_in(record, kill)  # this step or a later one: after the promotion either way
    connection = postgres.connect(lab, lab.host(OTHER_PRIMARY), statement_timeout_ms=None)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT slot_name FROM pg_replication_slots WHERE NOT active")
            assert cursor.fetchall(), "no slot holds the old primary's WAL"
            for _ in range(3):
                cursor.execute("SELECT pg_logical_emit_message(false, 'igops-test', 'segment'), pg_switch_wal()")
            cursor.execute("CHECKPOINT")
    finally:
        connection.close()
    done, _ = igops(lab, "ops", "resume", record["id"], "--yes")
    assert done.returncode == 0, done.stderr[-3000:]
    assert wait_for(lambda: pg_healthy(pg_state(lab)), 30, interval=0.5) == OTHER_PRIMARY, pg_state(lab)


# igops with the switchover's promotion ended by a fault as soon as db2 is promoted: SIGKILL (the
# run is cut off between its promotion and the repoint), or an error (a wait that gave up on a
# promotion that completed anyway).
PROMOTED_THEN = """
import os, signal, sys
from igops.errors import IgopsError
from igops.pg.actions import PgActions

promote = PgActions.promote
fault = sys.argv[1]


def promote_then_fault(self, node):
    promote(self, node)
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise IgopsError(f"{node} did not finish promoting in time", "see its Postgres log")


PgActions.promote = promote_then_fault
sys.argv = ["igops", *sys.argv[2:]]
from igops.launcher import main

main()
"""


def rejoin_slots(lab, node: str) -> list[str]:
    from igops import postgres

    connection = postgres.connect(lab, lab.host(node))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT slot_name FROM pg_replication_slots WHERE NOT active")
            return [row[0] for row in cursor.fetchall()]
    finally:
        connection.close()


@pytest.mark.parametrize("fault", ["kill", "error"])
def test_a_promotion_that_completed_as_its_run_was_cut_off_is_rolled_forward_never_back(home, tmp_path, fault):
    """The promotion took effect, the run did not get to say so: neither the run's own recovery
    (an error) nor `ops abort` (a SIGKILL) may start the old primary again or drop the slot that
    keeps its WAL for the rejoin. They say the promotion took effect; a rerun finishes."""
    lab = home
    with Load(lab, tmp_path, duration=600) as load:
        cut_off = subprocess.run(
            [sys.executable, "-c", PROMOTED_THEN, fault, "-c", str(lab.source)]
            + ["pg", "switchover", "main", "--to", OTHER_PRIMARY, "--yes", "--reason", f"promotion then {fault}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "NO_COLOR": "1"},
        )
        if fault == "kill":
            assert cut_off.returncode == -9, cut_off.stderr[-3000:]
            ttl = lab.model.coordination.lease_ttl
            record = interrupted_run(lab, "pg-switchover", Kill(8, cut_off_pid(lab)), ttl + 5)
            assert record is not None
            deadline = lab.model.coordination.lease_ttl + lab.model.pgbouncer.watchdog_deadline
            assert wait_for(lambda: not pg_state(lab)["paused"], deadline, interval=0.5), "PgBouncer still paused"
            done, answer = igops(lab, "ops", "abort", record["id"], "--yes")
            assert done.returncode == 0, done.stderr[-3000:]
            found = answer["data"]["not_undone"][0]
            assert f"it took effect: {OTHER_PRIMARY} is out of recovery" in found, answer["data"]
        else:
            assert cut_off.returncode == ExitCode.FAILED, cut_off.stderr[-3000:]
            assert f"took effect ({OTHER_PRIMARY} is out of recovery: it was promoted)" in cut_off.stderr
        assert pg_writable(pg_state(lab)) == [OTHER_PRIMARY], pg_state(lab)
        assert rejoin_slots(lab, OTHER_PRIMARY), "the slot that keeps the old primary's WAL was dropped"
        rerun, _ = igops(lab, "pg", "switchover", "main", "--to", OTHER_PRIMARY, "--yes")
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert wait_for(lambda: pg_healthy(pg_state(lab)), 30, interval=0.5) == OTHER_PRIMARY, pg_state(lab)
        assert sign_up_succeeds(lab)
    nothing_lost(load, [f"promotion then {fault}"])


def cut_off_pid(lab) -> int:
    """The pid the newest pg switchover's record names."""
    from igops import operations_view

    records = operations_view.list_operations(lab, include_ended=True).records
    return [record for record in records if record["kind"] == "pg-switchover"][-1]["pid"]


def snapshot_groups(lab, host: str) -> dict[str, str]:
    """group id -> state, of the host's snapshot groups."""
    from igops import snapshot_groups
    from igops.ebs import Ebs

    return {group.group_id: group.state for group in snapshot_groups.groups(Ebs(lab), host)}


@pytest.mark.timeout(900)
def test_a_snapshot_create_killed_at_every_step_is_resumed_or_aborted_and_leaves_nothing_frozen(home, tmp_path):
    """`snapshot create` of the standby, SIGKILLed at each step under load: its mounts are
    writable again at once (the thaw watchdog sees igops go), `ops list` shows it interrupted at
    that step, abort deletes what its group got, resume does that and takes a complete group."""
    from tests.reliability.test_snapshot_under_faults import can_write

    lab, host = home, OTHER_PRIMARY
    mounts = [mount.path for mount in lab.host(host).mounts]
    count = steps_planned(lab, "snapshot", "create", host)
    outcomes = []
    with Load(lab, tmp_path, duration=3600, rate=IN_FLIGHT_RATE) as load:
        for number in range(1, count + 1):
            before = snapshot_groups(lab, host)
            killed = time.monotonic()
            kill = killed_at(lab, ["snapshot", "create", host], number)
            assert kill is not None
            assert all(
                wait_for(lambda m=m: can_write(m, 0.5), lab.model.snapshot.freeze_deadline + 2) for m in mounts
            ), f"step {number}: a mount is still frozen"
            record = interrupted_run(lab, "snapshot-create", kill, 5)
            if record is None:
                outcomes.append(f"({number}) the run ended before the signal landed")
                continue
            landed = landed_in(record, kill)
            group = record["params"]["group"]
            way = way_for(landed)
            done, answer = igops(lab, "ops", way, record["id"], "--yes")
            after = snapshot_groups(lab, host)
            if way == "resume" and done.returncode == ExitCode.REFUSED and "is complete" in done.stderr:
                assert after[group] in ("complete", "pending"), after  # killed once its group was tagged
            else:
                assert done.returncode == 0, (number, way, done.stderr[-3000:])
                assert group not in after, (number, way, after)
                new = set(after) - set(before)
                if way == "resume":
                    assert [after[g] for g in new] in (["complete"], ["pending"]), (number, after)
                else:
                    assert not new, (number, after)
            assert sign_up_succeeds(lab), f"step {number}: writes do not flow"
            outcomes.append(f"[{landed}] {way}: {time.monotonic() - killed:.0f} s")
        assert load.running
    nothing_lost(load, outcomes)


@pytest.mark.timeout(900)
def test_a_deploy_killed_at_every_step_is_resumed_or_aborted_and_leaves_every_host_serving(home, tmp_path):
    """`deploy` of a new release in batches of one, SIGKILLed at each step under load: `ops list`
    shows it interrupted at that step; resume switches the hosts not yet on the release (a kill
    during the upload is continued by running the deploy again, as resume says), abort puts
    every host it drained back; either way no app server is left out of the load balancer."""
    from tests.reliability.test_deploy import APP_HOSTS, app_copy, current_of, upstream_text

    lab = home
    first = app_copy(tmp_path, "plan")
    # The /health gate only: the kill drill counts the plan's steps without the canary analysis.
    count = steps_planned(lab, "deploy", "--source", str(first), "--batch", "1", "--analysis", "0")
    outcomes = []
    with Load(lab, tmp_path, duration=3600, rate=IN_FLIGHT_RATE) as load:
        for number in range(1, count + 1):
            source = app_copy(tmp_path, f"kill-{number}")
            kill = killed_at(
                lab, ["deploy", "--source", str(source), "--batch", "1", "--analysis", "0"], number, required=False
            )
            if kill is None:
                # Some plan lines are rules, not steps ("stop at the first batch that …"): no
                # step of that number begins, and the run ends, every host on the release.
                releases = {host: current_of(host) for host in APP_HOSTS}
                assert len(set(releases.values())) == 1 and " down" not in upstream_text(), (number, releases)
                outcomes.append(f"[{number}] not a step: the run ended")
                continue
            record = interrupted_run(lab, "deploy", kill, 5)
            if record is None:
                outcomes.append(f"({number}) the run ended before the signal landed")
                continue
            landed = landed_in(record, kill)
            way = way_for(landed)
            done, answer = igops(lab, "ops", way, record["id"], "--yes")
            if way == "resume" and done.returncode == ExitCode.REFUSED:
                assert "run the deploy again" in done.stderr or "nothing to resume" in done.stderr, done.stderr
                if "run the deploy again" in done.stderr:
                    rerun, _ = igops(lab, "deploy", "--source", str(source), "--batch", "1", "--analysis", "0", "--yes")
                    assert rerun.returncode == 0, rerun.stderr[-3000:]
            else:
                assert done.returncode == 0, (number, way, done.stderr[-3000:])
            assert " down" not in upstream_text(), (number, way, upstream_text())
            releases = {host: current_of(host) for host in APP_HOSTS}
            if way == "resume":
                assert len(set(releases.values())) == 1, (number, releases)
            assert sign_up_succeeds(lab), f"step {number}: writes do not flow"
            outcomes.append(f"[{landed}] {way}: {releases}")
        assert load.running
    nothing_lost(load, outcomes)
    assert load.report["errors"] == 0, load.report["errors_by_kind"]
    back, _ = igops(lab, "deploy", "--analysis", "0", "--yes")  # the lab ends on the working tree's release
    assert back.returncode == 0, back.stderr[-3000:]


def etcd_pids(names: list[str]) -> list[int]:
    from igops.lab import proc, state

    paths = state.paths()
    return [proc.running_pid(paths.etcd_dir(name) / "etcd.pid", paths.root) for name in names]


def restart_etcd(names: list[str]) -> None:
    from igops.lab import etcd as lab_etcd, proc, state

    paths = state.paths()
    for name in names:
        proc.start(lab_etcd.daemon(paths, name), paths.root)
    lab_etcd.wait_healthy()


def etcd_leader() -> str:
    """The name of the etcd member that leads now."""
    import requests

    from igops.lab import state

    members = {}
    leader = None
    for name, address in state.ETCD_MEMBERS:
        answer = requests.post(f"http://{address}:{state.ETCD_CLIENT_PORT}/v3/maintenance/status", json={}, timeout=5)
        status = answer.json()
        members[status["header"]["member_id"]] = name
        leader = status["leader"]
    return members[leader]


@pytest.mark.parametrize("delay", [0.0, 1.5], ids=["as-it-starts", "during-it"])
def test_a_switchover_completes_with_the_etcd_leader_killed(home, delay):
    """The leader of three etcd members is lost as the switchover starts (its lease is granted
    once the other two have elected a leader) or while it works (the lease is renewed, and the
    journal written, by whichever answers): the switchover completes either way."""
    import signal as signals
    import threading

    from igops.lab import proc

    lab = home
    name = etcd_leader()
    killer = threading.Timer(delay, lambda: proc.terminate(etcd_pids([name]), sig=signals.SIGKILL))
    killer.start()
    try:
        result, envelope = igops(lab, "pg", "switchover", "main", "--to", OTHER_PRIMARY, "--yes")
        killer.join()
        assert result.returncode == 0, result.stderr[-3000:]
        assert envelope["data"]["after"]["primary"] == OTHER_PRIMARY
    finally:
        killer.cancel()
        restart_etcd([name])


def test_without_etcd_quorum_a_switchover_is_refused_and_reading_commands_work(home):
    from igops.lab import proc, state

    lab = home
    igops(lab, "ops", "list")  # a list read while etcd answered: what a stale read shows
    stopped = [member for member, _ in state.ETCD_MEMBERS[1:]]
    import signal as signals

    proc.terminate(etcd_pids(stopped), sig=signals.SIGKILL)
    try:
        result, envelope = igops(lab, "pg", "switchover", "main", "--to", OTHER_PRIMARY, "--yes")
        assert result.returncode == ExitCode.REFUSED, result.stderr[-3000:]
        assert "etcd cannot grant a lease" in envelope["error"]["message"]
        assert pg_state(lab)["primary"] == HOME_PRIMARY, "nothing was changed"
        for reading in (["status"], ["pg", "status", "main"], ["check", "--only", "operations"]):
            done, answer = igops(lab, *reading)
            assert answer is not None and answer["data"] is not None, (reading, done.stderr[-2000:])
        listed, answer = igops(lab, "ops", "list")
        assert listed.returncode == 0 and answer["data"]["stale"], answer
    finally:
        restart_etcd(stopped)
