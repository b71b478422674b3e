"""The Postgres failover planner's safety checks, from made-up cluster views: finishing a
failover repmgrd began checks the old primary as a failover does (asked again, refused while a
standby streams from it, --accept-risk for a host igops cannot fence or a hung postmaster); the
candidate is chosen by timeline before LSN; the bytes at risk compare positions on one timeline
only; and a member whose WAL is not on the new primary's history is left out of the follow, for
`igops pg rejoin` (test_pg_timelines runs the same judgement against real servers)."""

import pytest

from igops import inventory, postgres
from igops.commands import pg as pg_command
from igops.errors import Unavailable
from igops.failover import describe_plan
from igops.pg import actions as pg_actions, cluster as pg_cluster, failover_plans, plans as pg_plans, timelines
from igops.pg.hostcmd import WalEnd
from igops.role_change import Refused
from tests.unit.test_failover import FLEET, cut_short_view

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


@pytest.fixture(autouse=True)
def histories(monkeypatch) -> dict[tuple[str, int], dict[int, int]]:
    """Timeline histories as members hold them, (member, timeline) -> history; one not set here
    cannot be read. Nothing connects to the made-up members."""
    held: dict[tuple[str, int], dict[int, int]] = {}
    monkeypatch.setattr(timelines, "timeline_history", lambda fleet, host, timeline: held.get((host.name, timeline)))
    return held


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
    """`pg_view` of the cluster main (the failover's and the switchover's), made of `probes`,
    PgBouncer routing main to `routed_to`."""
    bouncers = {
        "pgb1": [postgres.BouncerDatabase("main", str(fleet.host(routed_to).address), 5432, "main", False, False)]
    }
    view = pg_cluster.PgView(fleet, "main", probes, bouncers, {}, [])
    addresses = {str(fleet.host(name).address): name for name in MEMBERS} | {name: name for name in MEMBERS}
    view.state = pg_cluster._pg_report(view, addresses)
    monkeypatch.setattr(failover_plans, "pg_view", lambda fleet, cluster: view)
    monkeypatch.setattr(pg_plans, "pg_view", lambda fleet, cluster: view)


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


def test_a_promotion_past_an_old_primary_really_down_is_finished_as_before(fleet, monkeypatch, asked_again, histories):
    # db3 stopped on timeline 3 before where db2's timeline 4 forked from it: it can follow db2.
    histories["db2", 4] = {3: 0x4FFF800}
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
    monkeypatch.setattr(failover_plans, "wal_end_on_disk", lambda fleet, host: WalEnd(4, 0x5000000))
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
    monkeypatch.setattr(failover_plans, "wal_end_on_disk", lambda fleet, host: WalEnd(4, 0x5000000))
    plan, _ = failover_plans.plan_pg_failover(fleet, "main")
    assert plan.new_primary == "db3" and plan.old_primary == "db2"
    assert plan.forced == [] and plan.bytes_at_risk == 0
    assert asked_again == ["db2"]


def test_an_older_timeline_candidate_named_takes_accept_risk(fleet, monkeypatch, asked_again):
    use_view(monkeypatch, fleet, earlier_failover(fleet), "db2")
    monkeypatch.setattr(failover_plans, "wal_end_on_disk", lambda fleet, host: WalEnd(4, 0x5000000))
    said = "db1 is on timeline 3, db3 on timeline 4: promoting db1 loses what was written on timeline 4"
    with pytest.raises(Refused, match=said):
        failover_plans.plan_pg_failover(fleet, "main", "db1")
    plan, _ = failover_plans.plan_pg_failover(fleet, "main", "db1", accept_risk=True)
    assert plan.new_primary == "db1"
    assert len(plan.forced) == 1 and plan.forced[0].startswith(said)
    assert plan.bytes_at_risk is None  # WAL on another timeline than db2's: not counted
    assert plan.not_followed == {"db3": "it is on timeline 4, newer than db1's 3"}


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


# --- who follows the new primary ----------------------------------------------------------------
FORK = 0x4FFF800  # where timeline 4 forked from timeline 3, in earlier_failover


def steps_of(plan) -> list[tuple]:
    return [(step.action, step.args) for step in plan.actions]


def test_a_fenced_old_primary_past_the_fork_is_left_out_of_the_follow_for_a_rejoin(
    fleet, monkeypatch, asked_again, histories
):
    """repmgr's follow of db1, after the point of no return, would fail: its WAL on timeline 3 goes
    past where db3's timeline 4 left it. The plan leaves it out, says so, and names the rejoin."""
    histories["db3", 4] = {1: 0x1000000, 3: FORK}
    use_view(monkeypatch, fleet, earlier_failover(fleet), "db2")
    monkeypatch.setattr(failover_plans, "wal_end_on_disk", lambda fleet, host: WalEnd(4, 0x5000000))
    plan, _ = failover_plans.plan_pg_failover(fleet, "main")
    assert plan.new_primary == "db3" and plan.forced == []
    assert "follow" not in [action for action, _ in steps_of(plan)]
    why = "its WAL on timeline 3 goes to 0/5000100, past 0/4FFF800, where db3's timeline 4 forked from it"
    assert plan.not_followed == {"db1": why}
    assert describe_plan(plan)["not_followed"] == {"db1": why}  # --json
    assert plan.notes[-1] == (
        f"db1 is left out of the follow: it cannot follow db3 ({why}); afterwards `igops pg rejoin db1` makes "
        "it a standby of db3 (pg_rewind if its WAL went past the fork)"
    )
    # At the fork itself, its WAL is on timeline 4's history: it follows.
    earlier = earlier_failover(fleet)
    earlier["db1"].server = standby(FORK, 3)
    use_view(monkeypatch, fleet, earlier, "db2")
    plan, _ = failover_plans.plan_pg_failover(fleet, "main")
    assert ("follow", ("db1", "db3")) in steps_of(plan) and plan.not_followed == {}
    # Without timeline 4's history, where timeline 3 ends on it cannot be told: left out.
    histories.clear()
    plan, _ = failover_plans.plan_pg_failover(fleet, "main")
    assert "follow" not in [action for action, _ in steps_of(plan)]
    assert plan.not_followed == {"db1": "it is on timeline 3, db3 on 4, whose history could not be read"}


def test_a_standby_with_more_wal_than_the_candidate_named_is_left_out_of_the_follow(fleet, monkeypatch, asked_again):
    """db2's promotion forks timeline 5 where db2's WAL ends: db3 has WAL past it."""
    probes = {
        "db1": stopped(fleet, "db1"),
        "db2": answering(fleet, "db2", standby(0x5000000, 4)),
        "db3": answering(fleet, "db3", standby(0x5000100, 4)),
    }
    use_view(monkeypatch, fleet, probes, "db1")
    monkeypatch.setattr(failover_plans, "wal_end_on_disk", lambda fleet, host: WalEnd(4, 0x5000100))
    plan, _ = failover_plans.plan_pg_failover(fleet, "main", "db2", accept_risk=True)
    assert plan.forced[0] == "db2 has 256 bytes less WAL than the most advanced standby"
    assert plan.not_followed == {"db3": "its WAL on timeline 4 goes to 0/5000100, past 0/5000000, all db2 has"}
    assert "follow" not in [action for action, _ in steps_of(plan)]
    plan, _ = failover_plans.plan_pg_failover(fleet, "main")  # db3, the most advanced: db2 follows it
    assert ("follow", ("db2", "db3")) in steps_of(plan) and plan.not_followed == {}


def test_finishing_a_promotion_leaves_out_a_standby_whose_wal_went_past_its_fork(
    fleet, monkeypatch, asked_again, histories
):
    """repmgrd promoted db2 while db3 had WAL db2 never received: db3 cannot follow db2. Nor is
    it taken for a follower while it streams from db2 on the old timeline (refused, it tries
    again): either way the plan names its rejoin."""
    histories["db2", 4] = {3: 0x5000000}
    why = "its WAL on timeline 3 goes to 0/5000100, past 0/5000000, where db2's timeline 4 forked from it"
    for upstream in (None, DB2):
        probes = {
            "db1": stopped(fleet, "db1"),
            "db2": answering(fleet, "db2", primary(0x5100000, 4)),
            "db3": answering(fleet, "db3", standby(0x5000100, 3, upstream)),
        }
        use_view(monkeypatch, fleet, probes, "db1")
        plan, _ = failover_plans.plan_pg_failover(fleet, "main")
        assert plan.title.startswith("Finish the failover of main: db2 was promoted already")
        assert "follow" not in [action for action, _ in steps_of(plan)]
        assert plan.not_followed == {"db3": why}
        assert plan.notes == [
            "afterwards: `igops pg rejoin db1` makes db1 a standby of db2",
            f"db3 is left out of the follow: it cannot follow db2 ({why}); afterwards `igops pg rejoin db3` "
            "makes it a standby of db2 (pg_rewind if its WAL went past the fork)",
        ]


def test_a_switchover_leaves_out_a_fenced_former_primary_past_the_fork(fleet, monkeypatch, histories):
    """Neither follow it nor wait for it to replay the release's checkpoint: both would fail."""
    histories["db3", 4] = {3: FORK}
    fenced = earlier_failover(fleet)["db1"]
    probes = {
        "db1": fenced,
        "db2": answering(fleet, "db2", primary(0x5100000, 4)),
        "db3": answering(fleet, "db3", standby(0x5100000, 4, DB2)),
    }
    use_view(monkeypatch, fleet, probes, "db2")
    monkeypatch.setattr(pg_plans, "_repmgr_check", lambda fleet, host: ([], []))
    monkeypatch.setattr(pg_plans, "_free_space_reasons", lambda fleet, host: [])
    plan, _ = pg_plans.plan_pg_switchover(fleet, "main", "db3")
    assert plan.forced == []
    assert plan.not_followed == {
        "db1": "its WAL on timeline 3 goes to 0/5000100, past 0/4FFF800, where db3's timeline 4 forked from it"
    }
    actions = steps_of(plan)
    assert not [args for action, args in actions if action in ("follow", "wait_streaming") and args[0] == "db1"]
    assert ("release_switch_segment", ("db3", ("db2",))) in actions
    assert ("rejoin", ("db2", "db3")) in actions  # the old primary is rejoined, as ever
    assert plan.notes[-1].startswith("db1 is left out of the follow: it cannot follow db3")


def test_the_result_names_the_members_left_to_rejoin(fleet, monkeypatch, asked_again, histories):
    histories["db3", 4] = {3: FORK}
    use_view(monkeypatch, fleet, earlier_failover(fleet), "db2")
    monkeypatch.setattr(failover_plans, "wal_end_on_disk", lambda fleet, host: WalEnd(4, 0x5000000))
    plan, before = failover_plans.plan_pg_failover(fleet, "main")
    monkeypatch.setattr(pg_actions, "execute", lambda steps, actions, reporter, hint, left_behind: [])
    result = pg_actions.apply_pg(fleet, plan)
    assert result.not_followed == plan.not_followed and list(result.not_followed) == ["db1"]
    shown = {}
    monkeypatch.setattr(pg_command, "run_plan", lambda *args, **kwargs: shown.update(kwargs))
    pg_command.run_pg_plan(None, fleet, plan, before, dry_run=False, yes=True, params={})
    assert shown["summary"](result).endswith(
        "; bytes at risk (old primary's WAL the new one never received): 0; left out of the follow, as they "
        "cannot follow db3: `igops pg rejoin db1`"
    )


# --- bytes at risk across timelines ---------------------------------------------------------------
def test_an_old_primary_on_a_newer_timeline_than_the_candidate_is_a_risk_that_cannot_be_counted(
    fleet, monkeypatch, asked_again
):
    """An earlier failover moved the primary from db1 (timeline 3) to db2 (4); db3 never followed
    db2; now db2 has died. db1, fenced, has the most WAL by LSN of the standbys, all on timeline 3:
    its 0/5000100 is past db2's end, 0/5000080, on timeline 4, yet a failover to it loses all that
    db2 wrote on timeline 4. No LSN comparison tells how much."""
    earlier = earlier_failover(fleet)
    earlier["db3"].server = standby(0x4FFF000, 3)
    use_view(monkeypatch, fleet, earlier, "db2")
    monkeypatch.setattr(failover_plans, "wal_end_on_disk", lambda fleet, host: WalEnd(4, 0x5000080))
    said = (
        "db2's WAL ends on timeline 4, db1 is on timeline 3: db1 holds no WAL of timeline 4, and promoting it "
        "loses what db2 wrote there (how much of db2's WAL db1 lacks cannot be counted)"
    )
    with pytest.raises(Refused) as refused:
        failover_plans.plan_pg_failover(fleet, "main")
    assert refused.value.message == f"refused: {said}"
    assert refused.value.hint == (
        "fail over to a member that holds db2's timeline 4 if one can be started (TL in `igops pg status main`), "
        "or restore db2; else --accept-risk"
    )
    plan, _ = failover_plans.plan_pg_failover(fleet, "main", accept_risk=True)
    assert plan.new_primary == "db1" and plan.forced == [said] and plan.bytes_at_risk is None


def test_an_old_primary_on_an_older_timeline_counts_from_where_the_candidates_history_left_it(
    fleet, monkeypatch, asked_again, histories
):
    """PgBouncer still routes to db1, down, whose WAL ends on timeline 3; repmgrd had promoted db2
    (timeline 4, forked at 0/5000000), down too; db3 followed db2. db3's LSN is far past db1's, but
    of db1's WAL it has only what lies before the fork: 2048 bytes are past it."""
    probes = {
        "db1": stopped(fleet, "db1"),
        "db2": stopped(fleet, "db2"),
        "db3": answering(fleet, "db3", standby(0x6000000, 4)),
    }
    use_view(monkeypatch, fleet, probes, "db1")
    monkeypatch.setattr(failover_plans, "wal_end_on_disk", lambda fleet, host: WalEnd(3, 0x5000800))
    histories["db3", 4] = {3: 0x5000000}
    with pytest.raises(Refused) as refused:
        failover_plans.plan_pg_failover(fleet, "main")
    assert refused.value.message == (
        "refused: db3 lacks 2048 bytes of db1's WAL (threshold 1000): a failover loses them"
    )
    plan, _ = failover_plans.plan_pg_failover(fleet, "main", accept_risk=True)
    assert plan.bytes_at_risk == 2048
    histories["db3", 4] = {3: 0x5000800}  # db1 stopped where timeline 4 forked: nothing is lost
    plan, _ = failover_plans.plan_pg_failover(fleet, "main")
    assert plan.bytes_at_risk == 0 and plan.forced == []
    histories.clear()
    with pytest.raises(Refused) as refused:
        failover_plans.plan_pg_failover(fleet, "main")
    assert refused.value.message == (
        "refused: db1's WAL ends on timeline 3, db3 is on timeline 4, whose history could not be read: how much "
        "of db1's WAL db3 lacks cannot be counted"
    )
    assert refused.value.hint == "restore the old primary if you can, or --accept-risk"


def test_a_switchover_resumed_after_its_stop_counts_the_wal_its_candidate_lacks_on_one_timeline_only(
    fleet, monkeypatch
):
    """db1, stopped by a switchover cut short, has WAL on timeline 5 that db2, on timeline 4, never
    received: db2's greater LSN on timeline 4 does not make up for it."""
    view = cut_short_view(fleet)
    for name, lsn in (("db2", 0x5000100), ("db3", 0x5000000)):
        view.probes[name].server = standby(lsn, 4, DB1)
    monkeypatch.setattr(pg_plans, "wal_end_on_disk", lambda fleet, host: WalEnd(5, 0x5000080))
    monkeypatch.setattr(pg_plans, "_free_space_reasons", lambda fleet, host: [])
    with pytest.raises(Refused) as refused:
        pg_plans._plan_pg_resume(view, "db1", "db2", accept_risk=False)
    assert refused.value.message == (
        "refused: db1's WAL ends on timeline 5, db2 is on timeline 4: db2 holds no WAL of timeline 5, and "
        "promoting it loses what db1 wrote there (how much of db1's WAL db2 lacks cannot be counted)"
    )
    monkeypatch.setattr(pg_plans, "wal_end_on_disk", lambda fleet, host: WalEnd(4, 0x5000100))
    plan = pg_plans._plan_pg_resume(view, "db1", "db2", accept_risk=False)
    assert plan.forced == [] and ("follow", ("db3", "db2")) in steps_of(plan)
