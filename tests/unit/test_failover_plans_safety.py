"""The Postgres failover planner's safety checks, from made-up cluster views: finishing a
failover repmgrd began checks the old primary as a failover does (asked again, refused while a
standby streams from it, --accept-risk for a host igops cannot fence or a hung postmaster), and
the candidate is chosen by timeline before LSN."""

import pytest

from igops import inventory, postgres
from igops.errors import Unavailable
from igops.pg import cluster as pg_cluster, failover_plans
from igops.role_change import Refused
from tests.unit.test_failover import FLEET

MEMBERS = ("db1", "db2", "db3")


@pytest.fixture
def fleet(tmp_path):
    path = tmp_path / "igops.toml"
    path.write_text(FLEET)
    return inventory.load_file(path)


@pytest.fixture
def asked_again(monkeypatch) -> list[str]:
    """The second probe of a presumed-dead primary, stood in for: it finds it still down (it
    sleeps and connects; test_a_primary_that_answers_again_is_refused runs it)."""
    asked: list[str] = []
    monkeypatch.setattr(failover_plans, "_confirm_pg_down", lambda fleet, state, name: asked.append(name))
    return asked


def standby(lsn: int, timeline: int | None, upstream: str | None = None) -> postgres.ServerState:
    return postgres.ServerState(
        True, timeline, None, lsn, lsn, False, None, "streaming" if upstream else None, upstream
    )


def primary(lsn: int, timeline: int) -> postgres.ServerState:
    return postgres.ServerState(False, timeline, lsn, None, None, False, None, None, None)


def answering(fleet, name: str, server: postgres.ServerState) -> pg_cluster.PgProbe:
    return pg_cluster.PgProbe(
        fleet.host(name), server, None, postmaster_running=True, fenced=False, host_reachable=True
    )


def stopped(fleet, name: str) -> pg_cluster.PgProbe:
    down = Unavailable(name, "connection refused", "refused")
    return pg_cluster.PgProbe(fleet.host(name), None, down, postmaster_running=False, fenced=False, host_reachable=True)


def unreachable(fleet, name: str) -> pg_cluster.PgProbe:
    return pg_cluster.PgProbe(fleet.host(name), None, Unavailable(name, "timeout", "timeout"), host_reachable=False)


def hung(fleet, name: str) -> pg_cluster.PgProbe:
    down = Unavailable(name, "timeout expired", "timeout")
    return pg_cluster.PgProbe(fleet.host(name), None, down, postmaster_running=True, fenced=True, host_reachable=True)


def use_view(monkeypatch, fleet, probes: dict[str, pg_cluster.PgProbe], routed_to: str) -> None:
    """`pg_view` of the cluster main, made of `probes`, PgBouncer routing main to `routed_to`."""
    bouncers = {
        "pgb1": [postgres.BouncerDatabase("main", str(fleet.host(routed_to).address), 5432, "main", False, False)]
    }
    view = pg_cluster.PgView(fleet, "main", probes, bouncers, {}, [])
    addresses = {str(fleet.host(name).address): name for name in MEMBERS} | {name: name for name in MEMBERS}
    view.state = pg_cluster._pg_report(view, addresses)
    monkeypatch.setattr(failover_plans, "pg_view", lambda fleet, cluster: view)


DB1 = "10.0.0.21"
DB2 = "10.0.0.22"


# --- finishing the failover repmgrd began --------------------------------------------------------
def test_a_promotion_while_a_standby_still_streams_from_the_old_primary_is_refused_even_forced(
    fleet, monkeypatch, asked_again
):
    """igops and db2 lost db1, which lives on, serving the app, with db3 streaming from it; repmgrd
    promoted db2. Repointing PgBouncer would lose every write db1 took since: refused, always."""
    probes = {
        "db1": unreachable(fleet, "db1"),
        "db2": answering(fleet, "db2", primary(0x5000000, 4)),
        "db3": answering(fleet, "db3", standby(0x5100000, 3, DB1)),
    }
    use_view(monkeypatch, fleet, probes, "db1")
    for accept_risk in (False, True):
        with pytest.raises(Refused) as refused:
            failover_plans.plan_pg_failover(fleet, "main", accept_risk=accept_risk)
        assert refused.value.message == "refused: db1 is not down: db3 still stream from it"
        assert "db2 was promoted meanwhile" in (refused.value.hint or "")
    assert asked_again == ["db1", "db1"]


def test_a_promotion_past_an_old_primary_igops_cannot_fence_takes_accept_risk(fleet, monkeypatch, asked_again):
    probes = {
        "db1": unreachable(fleet, "db1"),
        "db2": answering(fleet, "db2", primary(0x5000000, 4)),
        "db3": answering(fleet, "db3", standby(0x5000000, 4, DB2)),
    }
    use_view(monkeypatch, fleet, probes, "db1")
    with pytest.raises(Refused, match="db1's host is unreachable over SSH: it cannot be fenced on disk"):
        failover_plans.plan_pg_failover(fleet, "main")
    plan, _ = failover_plans.plan_pg_failover(fleet, "main", accept_risk=True)
    assert plan.title.startswith("Finish the failover of main: db2 was promoted already")
    assert len(plan.forced) == 1 and "db1's host is unreachable over SSH" in plan.forced[0]
    assert not any(step.action == "fence" for step in plan.actions)
    assert plan.new_primary == "db2" and plan.old_primary == "db1"


def test_a_promotion_past_a_hung_old_primary_takes_accept_risk_and_stops_it_though_fenced(
    fleet, monkeypatch, asked_again
):
    """A hung postmaster is not down; standby.signal counts only at a start, so the one on its disk
    does not keep a primary that recovers from taking writes: the fence stops it."""
    probes = {
        "db1": hung(fleet, "db1"),
        "db2": answering(fleet, "db2", primary(0x5000000, 4)),
        "db3": answering(fleet, "db3", standby(0x5000000, 4, DB2)),
    }
    use_view(monkeypatch, fleet, probes, "db1")
    with pytest.raises(Refused, match="db1's postmaster runs but does not answer"):
        failover_plans.plan_pg_failover(fleet, "main")
    plan, _ = failover_plans.plan_pg_failover(fleet, "main", accept_risk=True)
    assert [step.args for step in plan.actions if step.action == "fence"] == [("db1", True)]
    assert plan.forced and "hung" in plan.forced[0]


def test_a_promotion_past_an_old_primary_really_down_is_finished_as_before(fleet, monkeypatch, asked_again):
    probes = {
        "db1": stopped(fleet, "db1"),
        "db2": answering(fleet, "db2", primary(0x5000000, 4)),
        "db3": answering(fleet, "db3", standby(0x4FFF000, 3)),
    }
    use_view(monkeypatch, fleet, probes, "db1")
    plan, _ = failover_plans.plan_pg_failover(fleet, "main")
    assert asked_again == ["db1"]
    assert plan.forced == []
    assert [(step.action, step.args) for step in plan.actions] == [
        ("fence", ("db1", False)),
        ("repoint", ({"pgb1": ["main"]}, "db2")),
        ("register_primary", ("db2",)),
        ("follow", ("db3", "db2")),
    ]
    assert plan.notes == ["afterwards: `igops pg rejoin db1` makes db1 a standby of db2"]


def test_a_primary_that_answers_again_is_refused(fleet, monkeypatch):
    """The second probe itself, on both paths: a member that answers the second time restarted."""

    class Answers:
        def close(self) -> None:
            pass

    monkeypatch.setattr(failover_plans, "DOWN_PROBE_INTERVAL", 0)
    monkeypatch.setattr(failover_plans.postgres, "connect", lambda fleet, host, *args: Answers())
    monkeypatch.setattr(failover_plans, "wal_end_on_disk", lambda fleet, host: 0x5000000)
    db3 = answering(fleet, "db3", standby(0x5000000, 4))
    for db2 in (primary(0x5000000, 4), standby(0x5000000, 4)):
        use_view(
            monkeypatch, fleet, {"db1": stopped(fleet, "db1"), "db2": answering(fleet, "db2", db2), "db3": db3}, "db1"
        )
        with pytest.raises(Refused, match="refused: db1 answers again"):
            failover_plans.plan_pg_failover(fleet, "main")


# --- timelines -----------------------------------------------------------------------------------
def earlier_failover(fleet) -> dict[str, pg_cluster.PgProbe]:
    """An earlier failover moved the primary from db1 (timeline 3) to db2 (4); db1, fenced, runs
    read-only with WAL of its own past the fork; db3 follows db2; now db2 has died."""
    return {
        "db1": pg_cluster.PgProbe(
            fleet.host("db1"), standby(0x5000100, 3), None, postmaster_running=True, fenced=True, host_reachable=True
        ),
        "db2": stopped(fleet, "db2"),
        "db3": answering(fleet, "db3", standby(0x5000000, 4)),
    }


def test_the_standby_on_the_newest_timeline_wins_over_more_wal_on_an_older_one(fleet):
    view = pg_cluster.PgView(fleet, "main", {}, {}, {}, [])
    probes = earlier_failover(fleet)
    standbys = {name: probes[name] for name in ("db1", "db3")}
    assert failover_plans.best_standby(view, standbys) == "db3"
    # repmgr's priority 0 does not send the choice to an older timeline
    view.repmgr = [postgres.RepmgrNode(3, "db3", "standby", 2, True, 0, "")]
    assert failover_plans.best_standby(view, standbys) == "db3"
    # a standby whose timeline is unknown does not win over one known to be on a timeline
    standbys["db1"] = pg_cluster.PgProbe(fleet.host("db1"), standby(0x6000000, None), None)
    assert failover_plans.best_standby(view, standbys) == "db3"
    # with no timeline known, the LSNs are all there is
    standbys["db3"] = pg_cluster.PgProbe(fleet.host("db3"), standby(0x5000000, None), None)
    assert failover_plans.best_standby(view, standbys) == "db1"


def test_a_failover_promotes_the_newest_timeline_and_counts_bytes_within_it(fleet, monkeypatch, asked_again):
    use_view(monkeypatch, fleet, earlier_failover(fleet), "db2")
    monkeypatch.setattr(failover_plans, "wal_end_on_disk", lambda fleet, host: 0x5000000)
    plan, _ = failover_plans.plan_pg_failover(fleet, "main")
    assert plan.new_primary == "db3" and plan.old_primary == "db2"
    assert plan.forced == [] and plan.bytes_at_risk == 0
    assert asked_again == ["db2"]


def test_an_older_timeline_candidate_named_takes_accept_risk(fleet, monkeypatch, asked_again):
    use_view(monkeypatch, fleet, earlier_failover(fleet), "db2")
    monkeypatch.setattr(failover_plans, "wal_end_on_disk", lambda fleet, host: 0x5000000)
    said = "db1 is on timeline 3, db3 on timeline 4: promoting db1 loses what was written on timeline 4"
    with pytest.raises(Refused, match=said):
        failover_plans.plan_pg_failover(fleet, "main", "db1")
    plan, _ = failover_plans.plan_pg_failover(fleet, "main", "db1", accept_risk=True)
    assert plan.new_primary == "db1"
    assert len(plan.forced) == 1 and plan.forced[0].startswith(said)
    assert plan.bytes_at_risk is None  # WAL on another timeline than db2's: not counted


def test_with_every_member_a_standby_the_bytes_at_risk_compare_within_the_newest_timeline(
    fleet, monkeypatch, asked_again
):
    probes = {
        "db1": answering(fleet, "db1", standby(0x5000100, 3)),
        "db2": answering(fleet, "db2", standby(0x5000000, 4)),
        "db3": answering(fleet, "db3", standby(0x4FFF000, 4)),
    }
    use_view(monkeypatch, fleet, probes, "db2")
    plan, _ = failover_plans.plan_pg_failover(fleet, "main")
    assert plan.new_primary == "db2" and plan.bytes_at_risk == 0 and plan.forced == []
    with pytest.raises(Refused, match="db3 has 4096 bytes less WAL than the most advanced standby"):
        failover_plans.plan_pg_failover(fleet, "main", "db3")
    with pytest.raises(Refused, match="db1 is on timeline 3, db2, db3 on timeline 4"):
        failover_plans.plan_pg_failover(fleet, "main", "db1")
    assert asked_again == []
