"""The promotion of a failover (and of a switchover resumed after its stop), when repmgrd was
paused while no member was a primary: repmgrd reads its pause flag only before it begins a
failover of its own, so one under way may promote another standby. igops asks every other member
just before pg_promote (and refuses, nothing promoted, if one accepts writes) and just after (and
fails, naming it, if one does too).

The plans' shapes, and what a failure then undoes or releases, in the style of test_failover; the
promotion itself against real PostgreSQL 15 servers on loopback addresses of the test's own (a
standby to promote, another member that is a standby or a primary, and a member that is down),
with only repmgrd's own promotion stood in for (pg_promote run on the other member, from inside
igops' wait)."""

from pathlib import Path

import pytest

from igops import inventory
from igops.errors import IgopsError
from igops.operations import steps as step_runner
from igops.output import Reporter
from igops.pg import plan_steps, primary_actions
from igops.pg.actions import PgActions
from tests.unit import postgres_servers as servers
from tests.unit.inventories import unit_inventory

needs_postgres = servers.needs_postgres
DATABASES = {"pgb1": ["main"]}
ADDRESSES = {"db1": "127.77.0.1", "db2": "127.77.0.2", "db3": "127.77.0.3"}
HOSTS = [(name, address, "postgres") for name, address in ADDRESSES.items()] + [("pgb1", "127.77.0.9", "pgbouncer")]
POSTGRES = """[postgres]
port = {port}
[postgres.clusters.main]
primary = "db1"
standbys = ["db2", "db3"]
"""


class Recorder:
    """Actions that record their calls (test_failover's); `fail` names the one that raises."""

    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail

    def __getattr__(self, name):
        def action(*args):
            self.calls.append(name)
            if name == self.fail:
                raise IgopsError("boom")

        return action


@pytest.fixture
def fleet(tmp_path):
    return inventory.load_file(unit_inventory(tmp_path, HOSTS, sections=POSTGRES.format(port=5432)))


# --- the plans -----------------------------------------------------------------------------------
def test_a_failover_promotes_only_while_no_other_member_accepts_writes(fleet):
    steps = plan_steps.failover_steps(fleet, "db1", "db2", ["db3"], DATABASES, fence_on_disk=True, stop_first=False)
    promote = next(step for step in steps if step.action == "promote")
    assert promote.args == ("db2", True) and promote.point_of_no_return and promote.took_effect is None
    assert "refused if another member accepts writes first" in promote.title
    assert "a failure naming it if one does after" in promote.title
    # With nothing to fence (every member a standby), too.
    steps = plan_steps.failover_steps(fleet, None, "db2", ["db3"], DATABASES, fence_on_disk=False, stop_first=False)
    assert next(step for step in steps if step.action == "promote").args == ("db2", True)


def test_a_switchover_asks_the_others_only_when_resumed_after_its_stop(fleet):
    """A switchover pauses repmgrd while its primary runs and answers: no repmgrd failover can be
    under way then. One resumed after its stop pauses it while no member is a primary."""
    planned = plan_steps.switchover_steps(fleet, "db1", "db2", ["db3"], DATABASES)
    assert next(step for step in planned if step.action == "promote").args == ("db2",)
    resumed = plan_steps.switchover_steps(fleet, "db1", "db2", ["db3"], DATABASES, stopped=True, paused=DATABASES)
    promote = next(step for step in resumed if step.action == "promote")
    assert promote.args == ("db2", True) and not promote.point_of_no_return
    assert promote.took_effect.action == "promoted"


def test_a_failed_failover_promotion_is_never_undone_only_released(fleet):
    steps = plan_steps.with_repmgrd_paused(
        plan_steps.failover_steps(fleet, "db1", "db2", ["db3"], DATABASES, fence_on_disk=True, stop_first=False),
        on="db2",
        members=("db2", "db3"),
    )
    actions = Recorder(fail="promote")
    with pytest.raises(step_runner.StepFailed) as failed:
        step_runner.execute(steps, actions, Reporter(), "hint")
    assert failed.value.past_point_of_no_return
    assert actions.calls[actions.calls.index("promote") + 1 :] == ["resume", "unpause_repmgrd"]


# --- the promotion, against real servers -----------------------------------------------------------
@pytest.fixture(scope="module")
def template():
    """A cluster with repmgr's database (the promotion runs on a session to it), reachable over
    TCP on the test's loopback addresses."""
    data = servers.template()
    with open(data / "pg_hba.conf", "a") as hba:
        hba.write("host all all 127.0.0.0/8 trust\n")
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(f"listen_addresses = ''\nunix_socket_directories = '{data.parent}'\n")
    servers.start(data)
    servers.run([str(servers.BIN / "createdb"), "-h", str(data.parent), "-U", "postgres", "repmgr"])
    servers.stop(data)
    yield data
    servers.remove(data.parent, [data])


class Members:
    """The members' servers: copies of the template, each listening on its member's address and
    the fleet's port. A member not started is down (its address refuses connections)."""

    def __init__(self, base: Path, template: Path, port: int):
        self.base = base
        self.template = template
        self.port = port
        self.started: list[Path] = []

    def start(self, name: str, standby: bool) -> None:
        data = servers.copy_cluster(
            self.template,
            self.base / name,
            {"listen_addresses": ADDRESSES[name], "port": str(self.port), "unix_socket_directories": ""},
        )
        if standby:
            servers.run(["touch", str(data / "standby.signal")])
        self.started.append(data)
        servers.start(data)

    def connect(self, name: str):
        import psycopg2

        connection = psycopg2.connect(
            host=ADDRESSES[name], port=self.port, user="postgres", dbname="postgres", connect_timeout=5
        )
        connection.autocommit = True
        return connection

    def in_recovery(self, name: str) -> bool:
        connection = self.connect(name)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_is_in_recovery()")
                return bool(cursor.fetchone()[0])
        finally:
            connection.close()

    def promote(self, name: str) -> None:
        connection = self.connect(name)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_promote(true, 30)")
                assert cursor.fetchone()[0]
        finally:
            connection.close()


@pytest.fixture
def members(tmp_path, template, monkeypatch):
    base = servers.private_directory("igops-promote-")
    port = servers.free_port(ADDRESSES.values())
    made = Members(base, template, port)
    monkeypatch.delenv("IGOPS_POSTGRES_PASSWORD", raising=False)
    made.fleet = inventory.load_file(unit_inventory(tmp_path, HOSTS, sections=POSTGRES.format(port=port)))
    yield made
    servers.remove(base, made.started)


@needs_postgres
def test_the_candidate_is_not_promoted_while_another_member_accepts_writes(members):
    members.start("db2", standby=True)
    members.start("db3", standby=False)  # promoted by repmgrd before igops paused it
    actions = PgActions(members.fleet)
    try:
        with pytest.raises(IgopsError) as refused:
            actions.promote("db2", True)
    finally:
        actions.close()
    assert refused.value.message == (
        "db2 was not promoted: db3 accepts writes already (repmgrd, or someone, promoted it meanwhile)"
    )
    assert "`igops pg switchover main --to db3` finishes that failover" in refused.value.hint
    assert members.in_recovery("db2") and "db2" not in actions.promote_requested


@needs_postgres
def test_a_member_promoted_during_the_promotion_fails_it_naming_that_member(members, monkeypatch):
    members.start("db2", standby=True)
    members.start("db3", standby=True)
    wait = primary_actions.wait_promoted

    def repmgrd_promotes_db3_meanwhile(cursor, deadline):
        members.promote("db3")
        return wait(cursor, deadline)

    monkeypatch.setattr(primary_actions, "wait_promoted", repmgrd_promotes_db3_meanwhile)
    actions = PgActions(members.fleet)
    try:
        with pytest.raises(IgopsError, match=r"^SPLIT BRAIN: db2 was promoted, and db3 accepts writes too"):
            actions.promote("db2", True)
    finally:
        actions.close()
    assert not members.in_recovery("db2") and not members.in_recovery("db3")


@needs_postgres
def test_a_promotion_alone_says_whom_it_asked(members):
    members.start("db2", standby=True)
    members.start("db3", standby=True)
    actions = PgActions(members.fleet)
    try:
        detail = actions.promote("db2", True)
    finally:
        actions.close()
    assert detail.startswith("promoted in ")
    assert detail.endswith("; no other member accepts writes (db3 in recovery before and after; db1 did not answer)")
    assert not members.in_recovery("db2") and members.in_recovery("db3")


class PromotionOnly:
    """The real promotion and its probe (a PgActions'); every other action of the plan is recorded,
    not run."""

    def __init__(self, fleet):
        self.real = PgActions(fleet)
        self.calls: list[str] = []

    def __getattr__(self, name):
        real = getattr(self.real, name) if name in ("promote", "promoted") else None

        def action(*args):
            self.calls.append(name)
            return real(*args) if real else None

        return action


@needs_postgres
@pytest.mark.parametrize("db3", ["a primary already", "promoted meanwhile"])
def test_a_resumed_switchover_undoes_a_failed_promotion_only_if_its_probe_finds_none(members, monkeypatch, db3):
    """Refused (db3 a primary already): the probe finds the candidate in recovery, so the undos
    run, and the old primary's (unfence_and_start, see test_pg_undo) verifies every member again
    before it starts anything. Failed after it (db3 promoted meanwhile): the probe finds the
    candidate promoted, and the run rolls forward, only releasing."""
    members.start("db2", standby=True)
    members.start("db3", standby=db3 == "promoted meanwhile")
    if db3 == "promoted meanwhile":
        wait = primary_actions.wait_promoted

        def repmgrd_promotes_db3_meanwhile(cursor, deadline):
            members.promote("db3")
            return wait(cursor, deadline)

        monkeypatch.setattr(primary_actions, "wait_promoted", repmgrd_promotes_db3_meanwhile)
    steps = plan_steps.switchover_steps(members.fleet, "db1", "db2", ["db3"], DATABASES, stopped=True)
    actions = PromotionOnly(members.fleet)
    try:
        with pytest.raises(step_runner.StepFailed) as failed:
            step_runner.execute(steps, actions, Reporter(), "hint")
    finally:
        actions.real.close()
    assert failed.value.step.action == "promote"
    after = actions.calls[actions.calls.index("promote") + 1 :]
    if db3 == "a primary already":
        assert "db3 accepts writes already" in str(failed.value) and not failed.value.past_point_of_no_return
        assert after == ["promoted", "drop_rejoin_reservation", "unfence_and_start", "resume"]
        assert members.in_recovery("db2")
    else:
        assert "SPLIT BRAIN: db2 was promoted, and db3 accepts writes too" in str(failed.value)
        assert failed.value.past_point_of_no_return
        assert failed.value.recovery[0].detail == "db2 is out of recovery: it was promoted"
        assert after == ["promoted", "resume"]


def test_what_a_promotion_alone_says_of_the_others():
    before = primary_actions.OtherMembers([], ["db3", "db4"], ["db1"])
    after = primary_actions.OtherMembers([], ["db3"], ["db4"])
    assert before.described(after) == (
        "no other member accepts writes (db3 in recovery before and after; db4 in recovery before, no answer "
        "after; db1 did not answer)"
    )
    nobody = primary_actions.OtherMembers([], [], [])
    assert nobody.described(nobody) == "no other member accepts writes"
