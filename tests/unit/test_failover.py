"""Failover without a fleet: LSN arithmetic, the parsers for pg_controldata, pg_waldump and
PgBouncer's databases file, the Redis config rewrite, the plans' shapes and safety properties,
how candidates are chosen, and how a failing step is undone and released."""

import os
import signal
from contextlib import contextmanager

import pytest

from igops import failover, inventory, postgres, redis_failover, redisops, role_change
from igops.errors import ExitCode, IgopsError
from igops.operations import steps as step_runner
from igops.output import Reporter
from igops.pg import (
    cluster as pg_cluster,
    failover_plans as pg_failover_plans,
    plan_steps,
    plans as pg_plans,
    primary_actions,
    repmgrd,
)
from tests.conftest import run_igops

SEGMENT = 16 << 20
FLEET = """
[[hosts]]
name = "db1"
address = "10.0.0.21"
roles = ["postgres"]
[[hosts]]
name = "db2"
address = "10.0.0.22"
roles = ["postgres"]
[[hosts]]
name = "db3"
address = "10.0.0.23"
roles = ["postgres"]
[[hosts]]
name = "pgb1"
address = "10.0.0.20"
roles = ["pgbouncer"]
[[hosts]]
name = "redis1"
address = "10.0.0.31"
roles = ["redis"]
[[hosts]]
name = "redis2"
address = "10.0.0.32"
roles = ["redis"]
[[hosts]]
name = "redis3"
address = "10.0.0.33"
roles = ["redis"]
[postgres]
max_lag_bytes = 1000
max_lag_seconds = 5
[postgres.clusters.main]
primary = "db1"
standbys = ["db2", "db3"]
[redis]
master = "redis1"
replicas = ["redis2", "redis3"]
config_file = "/srv/{host}/redis.conf"
"""


@pytest.fixture
def fleet(tmp_path):
    path = tmp_path / "igops.toml"
    path.write_text(FLEET)
    return inventory.load_file(path)


# --- LSNs and host tool output -----------------------------------------------------------------
def test_lsn_round_trip_and_arithmetic():
    assert postgres.parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert postgres.format_lsn(postgres.parse_lsn("0/3000180")) == "0/3000180"
    assert postgres.parse_lsn("1/0") - postgres.parse_lsn("0/FFFFFFFF") == 1
    with pytest.raises(ValueError):
        postgres.parse_lsn("3000180")


def test_segment_names_map_to_their_first_byte():
    assert postgres.segment_start("000000030000000100000002", SEGMENT) == (3, (1 << 32) + 2 * SEGMENT)


def test_controldata_lines():
    values = postgres.parse_controldata(
        "Database cluster state:               shut down\n"
        "Latest checkpoint location:           0/1201CD00\n"
        "Latest checkpoint's TimeLineID:       3\n"
    )
    assert values["Database cluster state"] == "shut down"
    assert values["Latest checkpoint's TimeLineID"] == "3"


@pytest.mark.parametrize(
    "message, end",
    [
        (
            "pg_waldump: error: error in WAL record at 0/3382538: invalid record length at 0/3382570: wanted 24, got 0",
            "0/3382570",
        ),
        (
            "pg_waldump: error: error in WAL record at 0/5000060: "
            "record with incorrect prev-link 0/4FFFF28 at 0/50000D8",
            "0/50000D8",
        ),
        (
            "pg_waldump: error: error in WAL record at 0/14FFFFA0: unexpected pageaddr 0/C000000 in log segment "
            "000000010000000000000015, offset 0",
            "0/15000000",
        ),
        (
            "pg_waldump: error: error in WAL record at 0/14FFFFA0: invalid magic number 0000 in log segment "
            "000000020000000000000015, offset 8192",
            "0/15002000",
        ),
        ('pg_waldump: error: could not find file "000000010000000000000016": No such file or directory', "0/16000000"),
    ],
)
def test_the_end_of_wal_from_where_pg_waldump_stops(message, end):
    assert postgres.wal_end_from_waldump(message, SEGMENT) == postgres.parse_lsn(end)


def test_an_unexpected_waldump_message_gives_no_end():
    assert postgres.wal_end_from_waldump("pg_waldump: error: out of memory", SEGMENT) is None


def test_single_user_runs_with_the_options_the_server_last_started_with():
    opts = '/usr/lib/postgresql/15/bin/postgres "-D" "/etc/postgresql/15/main" "-c" "config_file=/etc/x.conf"\n'
    assert postgres.server_arguments(opts, "/data") == [
        "-D",
        "/etc/postgresql/15/main",
        "-c",
        "config_file=/etc/x.conf",
    ]
    assert postgres.server_arguments("", "/data") == ["-D", "/data"]


# --- PgBouncer's databases file ----------------------------------------------------------------
DATABASES = """[databases]
; the shard clusters
main = host=10.0.0.21 port=5432 dbname=instagram pool_size=40
directory = host=10.0.0.21 port=5432 dbname=directory
pg2 = host=10.0.0.23 port=5432 dbname=instagram
sock = dbname=local application_name='a b'
"""


def test_repoint_changes_only_the_named_entries():
    text = postgres.repoint_databases(DATABASES, {"main", "directory"}, "10.0.0.22", 5433)
    lines = text.splitlines()
    assert lines[1] == "; the shard clusters"
    assert lines[2] == "main = host=10.0.0.22 port=5433 dbname=instagram pool_size=40"
    assert lines[3] == "directory = host=10.0.0.22 port=5433 dbname=directory"
    assert lines[4] == "pg2 = host=10.0.0.23 port=5432 dbname=instagram"
    assert text.endswith("\n")


def test_repoint_adds_host_and_port_and_keeps_quoted_values():
    text = postgres.repoint_databases(DATABASES, {"sock"}, "10.0.0.9", 5432)
    assert "sock = host=10.0.0.9 port=5432 dbname=local application_name='a b'" in text


def test_repoint_is_idempotent_and_refuses_unknown_entries():
    once = postgres.repoint_databases(DATABASES, {"main"}, "10.0.0.22", 5432)
    assert postgres.repoint_databases(once, {"main"}, "10.0.0.22", 5432) == once
    with pytest.raises(ValueError, match="missing"):
        postgres.repoint_databases(DATABASES, {"missing"}, "10.0.0.22", 5432)


def test_repoint_leaves_other_sections_alone():
    text = "[pgbouncer]\nmain = host=1.1.1.1\n[databases]\nmain = host=10.0.0.21\n"
    assert postgres.repoint_databases(text, {"main"}, "10.0.0.22", 5432).splitlines()[1] == "main = host=1.1.1.1"


# --- the Redis config file ----------------------------------------------------------------------
REDIS_CONF = "bind 10.0.0.31\nport 6379\nslaveof 10.0.0.9 6379\nreplica-read-only no\nappendonly yes\n\n"


def test_a_replica_config_names_its_master_and_is_read_only():
    text = redisops.with_replicaof(REDIS_CONF, ("10.0.0.32", 6379))
    assert text == "bind 10.0.0.31\nport 6379\nappendonly yes\nreplicaof 10.0.0.32 6379\nreplica-read-only yes\n"
    assert redisops.configured_master(text) == ("10.0.0.32", 6379)
    assert redisops.with_replicaof(text, ("10.0.0.32", 6379)) == text


def test_a_master_config_has_no_role_lines():
    text = redisops.with_replicaof(REDIS_CONF, None)
    assert "replicaof" not in text and "slaveof" not in text and redisops.configured_master(text) is None


# --- plans ---------------------------------------------------------------------------------------
DATABASES_ON_MAIN = {"pgb1": ["directory", "main"]}


def test_switchover_stops_before_it_promotes_and_undoes_only_before_it_repoints(fleet):
    steps = plan_steps.switchover_steps(fleet, "db1", "db2", ["db3"], DATABASES_ON_MAIN)
    actions = [step.action for step in steps]
    assert (
        actions.index("pause")
        < actions.index("stop_and_fence")
        < actions.index("wait_received")
        < actions.index("promote")
        < actions.index("repoint")
        < actions.index("resume")
        < actions.index("rejoin")
    )
    pause = steps[actions.index("pause")]
    assert pause.release.action == "resume" and pause.release.args == (DATABASES_ON_MAIN,)
    # The plan (and so the dry run) says a watchdog is armed first, and its deadline.
    assert pause.title.startswith(
        "PgBouncer: arm a watchdog on pgb1 (it RESUMEs them if igops is gone or silent "
        "for 15 s), then PAUSE pgb1: directory, main"
    )
    assert "watch" not in actions
    stop = steps[actions.index("stop_and_fence")]
    assert stop.undo.action == "unfence_and_start" and stop.undo.args == ("db1", ("db2",))
    # A failed promotion is still undone (the undo verifies the candidate first); from the repoint on
    # nothing is.
    promote = steps[actions.index("promote")]
    assert not promote.point_of_no_return and promote.args == ("db2",)
    assert promote.took_effect.action == "promoted" and promote.took_effect.args == ("db2",)
    assert steps[actions.index("repoint")].point_of_no_return
    assert steps[actions.index("rejoin") - 3].action == "checkpoint"  # pg_rewind needs the new timeline
    assert ("follow", ("db3", "db2")) in [(step.action, step.args) for step in steps]


def test_failover_fences_before_it_promotes(fleet):
    steps = plan_steps.failover_steps(fleet, "db1", "db2", [], DATABASES_ON_MAIN, fence_on_disk=True, stop_first=False)
    actions = [step.action for step in steps]
    assert actions[:3] == ["hold", "fence", "repoint"]
    assert steps[0].title.startswith(
        "PgBouncer: arm a watchdog on pgb1 (it RESUMEs them if igops is gone or silent "
        "for 15 s), then hold pgb1: directory, main"
    )
    assert actions.index("promote") < actions.index("resume")
    assert steps[0].release.action == "resume"


def test_failover_without_a_reachable_old_host_cannot_fence_on_disk(fleet):
    steps = plan_steps.failover_steps(fleet, "db1", "db2", [], DATABASES_ON_MAIN, fence_on_disk=False, stop_first=False)
    assert "fence" not in [step.action for step in steps]


def test_redis_switchover_demotes_before_it_repoints_and_unpauses_last(fleet):
    steps = redis_failover.redis_switchover_steps(fleet, "redis1", "redis2", ["redis3"])
    actions = [step.action for step in steps]
    assert actions[:5] == ["hold_connections", "pause_writes", "wait_offset", "promote", "demote"]
    assert actions.index("demote") < actions.index("point_app") < actions.index("unpause")
    assert steps[1].release.action == "unpause"
    assert steps[3].undo.args == ("redis2", "redis1")
    # Once it took effect nothing is undone: its probe, not a point of no return, says so.
    assert not steps[4].point_of_no_return and steps[4].took_effect.action == "demoted"
    assert ("replicate", ("redis3", "redis2")) in [(step.action, step.args) for step in steps]


def test_a_plan_is_signed_with_roles_and_routes_not_positions(fleet):
    def view(primary, routed_to, lag):
        nodes = [
            failover.PgNode("db1", "10.0.0.21", "primary" if primary == "db1" else "standby", "running"),
            failover.PgNode("db2", "10.0.0.22", "primary" if primary == "db2" else "standby", "running", lag_bytes=lag),
        ]
        made = pg_cluster.PgView(fleet, "main", {}, {}, {}, [])
        made.state = failover.PgClusterState("main", nodes, primary, {"pgb1": {"main": routed_to}}, {})
        return made

    plan = pg_plans.signed(failover.PgPlan("switchover", "main", "t", "db1", "db2"), view("db1", "db1", 10))
    assert plan.signature == pg_plans.signature(view("db1", "db1", 99999))
    assert plan.signature != pg_plans.signature(view("db2", "db1", 10))
    assert plan.signature != pg_plans.signature(view("db1", "db2", 10))
    described = failover.describe_plan(plan)
    assert "signature" not in described and "actions" not in described and described["steps"] == []


def test_a_settling_member_may_start_answer_and_stream_between_its_plan_and_its_run(fleet):
    """A rebuild run again right after the run before it was cut off past the start: the member
    it waits out is left out of the signature (its role, state and upstream), no other is."""

    def view(db2: tuple[str, str, str | None], db1_state: str = "running"):
        role, state, upstream = db2
        nodes = [
            failover.PgNode("db1", "10.0.0.21", "primary", db1_state),
            failover.PgNode("db2", "10.0.0.22", role, state, streaming_from=upstream),
        ]
        made = pg_cluster.PgView(fleet, "main", {}, {}, {}, [])
        made.state = failover.PgClusterState("main", nodes, "db1", {"pgb1": {"main": "db1"}}, {})
        return made

    starting = view(("unknown", "starting or stopping", None))
    plan = failover.PgPlan("rebuild", "main", "t", "db1", "db1", settling="db2")
    pg_plans.signed(plan, starting)
    for later in (("standby", "running", None), ("standby", "running", "db1")):
        assert pg_plans.signature(view(later), "db2") == plan.signature
    assert pg_plans.signature(view(("standby", "running", "db1"), db1_state="stopped"), "db2") != plan.signature
    assert pg_plans.signature(view(("standby", "running", "db1"))) != pg_plans.signature(starting)
    assert "settling" not in failover.describe_plan(plan)  # how the plan is checked, not what it does


def test_a_member_follows_the_primary_only_streaming_on_its_timeline():
    """A rejoin does nothing (or only records it) for a member that follows the primary already.
    A fenced old primary whose WAL went past the fork streams from the new primary for a moment
    on its old timeline, is refused and tries again: it does not follow, and is rejoined."""
    from igops.pg.cluster import follows

    primary = failover.PgNode("db2", "10.0.0.22", "primary", "running", timeline=8)

    def member(upstream: str | None, timeline: int | None) -> failover.PgNode:
        return failover.PgNode("db1", "10.0.0.21", "standby", "running", timeline=timeline, streaming_from=upstream)

    assert follows(member("db2", 8), primary)
    assert not follows(member("db2", 7), primary)
    assert not follows(member(None, 8), primary)
    assert not follows(member("db3", 8), primary)
    assert not follows(member("db2", None), primary)


def test_a_member_streaming_on_an_older_timeline_is_a_problem_and_no_switchover_candidate(fleet):
    """`pg status` and a switchover's check of its candidate read "follows" as the rejoin does: a
    fenced old primary flickering into streaming from the new primary is not counted as following."""
    from igops.pg.cluster import why_not_following

    nodes = [
        failover.PgNode("db2", "10.0.0.22", "primary", "running", timeline=8, pgbouncer=["pgb1:main"]),
        failover.PgNode("db1", "10.0.0.21", "standby", "running", timeline=7, streaming_from="db2"),
    ]
    state = failover.PgClusterState("main", nodes, "db2", {"pgb1": {"main": "db2"}}, {})
    said = "streams from db2 on timeline 7, not on its timeline 8"
    assert why_not_following(nodes[1], nodes[0]) == said
    assert f"db1 {said}" in pg_cluster.pg_problems(fleet, state, ["db2"], view_with({}))
    nodes[1].timeline = 8
    assert why_not_following(nodes[1], nodes[0]) is None
    assert not [p for p in pg_cluster.pg_problems(fleet, state, ["db2"], view_with({})) if "stream" in p]
    nodes[1].streaming_from = None
    assert why_not_following(nodes[1], nodes[0]) == "does not stream from db2"
    nodes[1].streaming_from = "db3"
    assert why_not_following(nodes[1], nodes[0]) == "does not stream from db2 (it streams from db3)"


def test_a_rejoining_members_upstream_may_change_between_its_plan_and_its_run(fleet):
    """A fenced old primary started again connects its walreceiver to the new primary a moment
    later, between a rejoin's plan and its run, say: the rejoin stops it whatever it streams from,
    so its upstream is left out of the signature. Its role is not: one promoted in between would
    have writes the rejoin discards."""

    def view(db1_role: str, db1_upstream: str | None):
        nodes = [
            failover.PgNode("db1", "10.0.0.21", db1_role, "running", streaming_from=db1_upstream),
            failover.PgNode("db2", "10.0.0.22", "primary", "running"),
        ]
        made = pg_cluster.PgView(fleet, "main", {}, {}, {}, [])
        made.state = failover.PgClusterState("main", nodes, "db2", {"pgb1": {"main": "db2"}}, {})
        return made

    plan = pg_plans.signed(failover.PgPlan("rejoin", "main", "t", None, "db2", rejoining="db1"), view("standby", None))
    assert pg_plans.signature(view("standby", "db2"), rejoining="db1") == plan.signature
    assert pg_plans.signature(view("primary", None), rejoining="db1") != plan.signature
    assert pg_plans.signature(view("standby", "db2")) != pg_plans.signature(view("standby", None))
    assert "rejoining" not in failover.describe_plan(plan)


def test_a_rejoining_replicas_link_may_come_up_between_its_plan_and_its_run():
    """A Redis node started again as a replica finishes its first sync a moment later, between a
    rejoin's plan and its run: the rejoin waits for that link, so its coming up leaves the plan
    valid. Another node's link still counts, and so does the rejoining node's role."""
    from igops.redis_tier import RedisNode, RedisState, RedisView

    def view(redis1_role: str, redis1_link: str, redis3_link: str = "up"):
        nodes = [
            RedisNode("redis1", "10.0.0.31", redis1_role, "running", master="redis2", link=redis1_link),
            RedisNode("redis2", "10.0.0.32", "master", "running"),
            RedisNode("redis3", "10.0.0.33", "replica", "running", master="redis2", link=redis3_link),
        ]
        return RedisView(None, {}, {}, RedisState(nodes, "redis2", "10.0.0.32", 1))

    plan = redis_failover.signed(
        redis_failover.RedisPlan("rejoin", "t", None, "redis2", settling="redis1"), view("replica", "down (1 s)")
    )
    assert redis_failover.signature(view("replica", "up"), "redis1") == plan.signature
    assert redis_failover.signature(view("master", "up"), "redis1") != plan.signature
    assert redis_failover.signature(view("replica", "down (1 s)", "down (1 s)"), "redis1") != plan.signature
    assert redis_failover.signature(view("replica", "up")) != redis_failover.signature(view("replica", "down (1 s)"))
    assert "settling" not in failover.describe_plan(plan)


def test_a_rejoin_leaves_the_link_out_only_when_it_waits_for_it(fleet, monkeypatch):
    """A rejoin that waits for the link tolerates it coming up (or going down) before its run; one
    with nothing to do is stale if the link drops, and is refused then. (The view and the config
    file are stood in for: what they hold is the live tier's.)"""
    from igops.redis_tier import RedisNode, RedisState, RedisView

    def view(link: str) -> RedisView:
        nodes = [
            RedisNode("redis1", "10.0.0.31", "replica", "running", master="redis2", link=link),
            RedisNode("redis2", "10.0.0.32", "master", "running"),
        ]
        master = redisops.NodeState("master", 10, None, None, 3, True, 100, "b")
        return RedisView(fleet, {"redis1": replica(10), "redis2": master}, {}, RedisState(nodes, "redis2", None, 1))

    monkeypatch.setattr(redis_failover, "read_file", lambda fleet, host, path: "replicaof 10.0.0.32 6379\n")
    for link, waits in (("down (2 s)", True), ("up", False)):
        monkeypatch.setattr(redis_failover, "redis_view", lambda fleet, link=link: view(link))
        plan, _ = redis_failover.plan_redis_rejoin(fleet, "redis1")
        assert [step.action for step in plan.actions] == (["wait_link"] if waits else [])
        assert plan.settling == ("redis1" if waits else None)
        flipped = view("up" if link != "up" else "down (0 s)")
        assert (redis_failover.signature(flipped, plan.settling) == plan.signature) is waits


# --- candidates and thresholds -------------------------------------------------------------------
def server(received, replayed=None, paused=False):
    return postgres.ServerState(
        True, 1, None, received, replayed if replayed is not None else received, paused, None, "streaming", "10.0.0.21"
    )


def view_with(repmgr_priorities):
    nodes = [
        postgres.RepmgrNode(index, name, "standby", 1, True, priority, "")
        for index, (name, priority) in enumerate(repmgr_priorities.items(), 2)
    ]
    return pg_cluster.PgView(None, "main", {}, {}, {}, nodes)


def test_the_standby_with_the_most_wal_wins_then_priority():
    standbys = {"db2": pg_cluster.PgProbe(None, server(100), None), "db3": pg_cluster.PgProbe(None, server(200), None)}
    assert pg_failover_plans.best_standby(view_with({"db2": 100, "db3": 100}), standbys) == "db3"
    standbys["db2"] = pg_cluster.PgProbe(None, server(200), None)
    assert pg_failover_plans.best_standby(view_with({"db2": 100, "db3": 50}), standbys) == "db2"
    assert pg_failover_plans.best_standby(view_with({"db2": 0, "db3": 50}), standbys) == "db3"


def replica(offset, priority=100, run_id="a"):
    return redisops.NodeState("replica", offset, "10.0.0.31:6379", False, 3, True, priority, run_id)


def test_the_replica_with_the_highest_offset_wins_and_priority_zero_never():
    assert redis_failover.best_replica({"redis2": replica(10), "redis3": replica(20)}) == "redis3"
    assert redis_failover.best_replica({"redis2": replica(20, 10), "redis3": replica(20, 50)}) == "redis2"
    assert redis_failover.best_replica({"redis2": replica(10), "redis3": replica(20, 0)}) == "redis2"


def test_lag_beyond_the_thresholds_or_paused_replay_is_a_reason_to_refuse(fleet):
    node = failover.PgNode("db2", "10.0.0.22", "standby", "running", lag_bytes=5000, lag_s=9.0, replay_paused=True)
    reasons = pg_plans.lag_reasons(fleet, node)
    assert len(reasons) == 3 and "replay paused" in reasons[0] and "threshold 1000" in reasons[1]
    healthy = failover.PgNode("db2", "10.0.0.22", "standby", "running", lag_bytes=10, lag_s=0.0)
    assert pg_plans.lag_reasons(fleet, healthy) == []


def test_refusals_name_every_reason_unless_forced():
    forced: list[str] = []
    with pytest.raises(failover.Refused) as refused:
        role_change.refuse_or_force("state", ["a", "b"], False, forced, "hint")
    assert refused.value.exit_code == ExitCode.REFUSED and "a; b" in refused.value.message
    assert refused.value.state == "state"
    role_change.refuse_or_force("state", ["a"], True, forced, "hint")
    assert forced == ["a"]


def test_problems_a_status_reports(fleet):
    nodes = [
        failover.PgNode("db1", "10.0.0.21", "primary", "running", pgbouncer=["pgb1:main"]),
        failover.PgNode("db2", "10.0.0.22", "primary", "running"),
        failover.PgNode("db3", "10.0.0.23", "unknown", "stopped", fenced=True),
    ]
    state = failover.PgClusterState("main", nodes, None, {"pgb1": {"main": "db2"}}, {"pgb1": ["main"]})
    problems = pg_cluster.pg_problems(fleet, state, ["db1", "db2"], view_with({}))
    assert problems[0] == "SPLIT BRAIN: db1 and db2 both accept writes"
    assert state.fixes[problems[0]] == (
        "stop db1, then `igops pg rejoin db1 --accept-risk` (it loses what it took alone)"
    )
    assert "db3: stopped (fenced)" in problems
    assert "pgb1: main routes to db2, which is not the primary" in problems
    assert "pgb1: main PAUSED" in problems


def probed(name, server=None, running=None, control=None, fenced=False):
    probe = pg_cluster.PgProbe(
        None,
        server,
        None if server else postgres.Unavailable(name, "refused", "refused"),
        postmaster_running=running,
        fenced=fenced,
        host_reachable=True,
    )
    probe.control_state = control
    return probe


def cut_short_view(fleet, db1_control="shut down", paused=True, routed="db1"):
    """db1 stopped by a switchover that was killed before db2 was promoted; db3 a healthy standby."""
    probes = {
        "db1": probed("db1", running=False, control=db1_control, fenced=True),
        "db2": probed("db2", server(100)),
        "db3": probed("db3", server(100)),
    }
    nodes = [
        failover.PgNode(
            "db1", "10.0.0.21", "unknown", "stopped", fenced=True, control_state=db1_control, pgbouncer=["pgb1:main"]
        ),
        failover.PgNode("db2", "10.0.0.22", "standby", "running", fenced=True),
        failover.PgNode("db3", "10.0.0.23", "standby", "running", fenced=True),
    ]
    made = pg_cluster.PgView(fleet, "main", probes, {}, {}, [])
    made.state = failover.PgClusterState(
        "main",
        nodes,
        None,
        {"pgb1": {"main": routed, "directory": routed}},
        {"pgb1": ["directory", "main"]} if paused else {},
    )
    return made


def test_status_names_the_command_that_resolves_a_switchover_cut_short(fleet):
    view = cut_short_view(fleet)
    problems = pg_cluster.pg_problems(fleet, view.state, [], view)
    assert pg_cluster.interrupted_switchover(view) == "db1"
    assert problems[0].startswith("no primary: db1 was stopped cleanly and fenced by a switchover cut short")
    fix = view.state.fixes[problems[0]]
    assert "`igops pg switchover main --to db2` finishes it" in fix
    assert "`igops pg switchover main --to db1` rolls it back" in fix
    assert all(view.state.fixes.get(problem) for problem in problems), problems


def test_a_crashed_or_unrouted_primary_is_no_switchover_cut_short(fleet):
    assert pg_cluster.interrupted_switchover(cut_short_view(fleet, db1_control="in production")) is None
    assert pg_cluster.interrupted_switchover(cut_short_view(fleet, routed="db2")) is None
    view = cut_short_view(fleet, db1_control="in production")
    problems = pg_cluster.pg_problems(fleet, view.state, [], view)
    assert view.state.fixes[problems[0]] == "`igops pg failover main`"


def test_a_switchover_cut_short_after_its_stop_is_finished_from_the_stop(fleet):
    paused = {"pgb1": ["directory", "main"]}
    steps = plan_steps.switchover_steps(fleet, "db1", "db2", ["db3"], DATABASES_ON_MAIN, stopped=True, paused=paused)
    actions = [step.action for step in steps]
    assert not {"checkpoint", "checkpoint_before_stop"} & set(actions[: actions.index("stop_and_fence")])  # db1 is down
    assert "pause" not in actions  # PAUSE on a paused database is an error; they stay paused
    # ... with a watchdog of their own again before anything else acts (the interrupted run's is gone).
    watch = steps[actions.index("watch")]
    assert actions.index("watch") < actions.index("stop_and_fence")
    assert watch.args == (paused,) and watch.release.action == "resume"
    assert "arm a watchdog on pgb1 (it RESUMEs them if igops is gone or silent for 15 s)" in watch.title
    stop = steps[actions.index("stop_and_fence")]
    assert stop.release.action == "resume" and stop.undo.action == "unfence_and_start"
    assert "(stopped already)" in stop.title
    assert actions.index("wait_received") < actions.index("promote") < actions.index("repoint")


def test_a_switchover_cut_short_is_rolled_back_when_the_stopped_primary_is_the_target(fleet):
    plan = pg_plans.plan_pg_roll_back(cut_short_view(fleet), "db1")
    assert [(step.action, step.args) for step in plan.actions] == [
        ("pause_repmgrd", ("db2",)),
        ("unfence_and_start", ("db1", ("db2", "db3"))),
        ("resume", ({"pgb1": ["directory", "main"]},)),
        ("wait_streaming", ("db2", "db1")),
        ("drop_rejoin_reservation", ("db2", "db1")),
        ("wait_streaming", ("db3", "db1")),
        ("drop_rejoin_reservation", ("db3", "db1")),
        ("unpause_repmgrd", (("db1", "db2", "db3"),)),
    ]


def test_the_old_primarys_rejoin_wal_is_reserved_before_the_promotion_and_released_if_it_is_undone(fleet):
    # Nothing else holds that WAL on the new primary until the rejoin: its CHECKPOINT could
    # remove the segment the rejoin starts from.
    steps = plan_steps.switchover_steps(fleet, "db1", "db2", ["db3"], DATABASES_ON_MAIN)
    actions = [step.action for step in steps]
    reserve = steps[actions.index("reserve_rejoin_wal")]
    assert reserve.args == ("db2", "db1") and reserve.undo.action == "drop_rejoin_reservation"
    assert actions.index("wait_received") < actions.index("reserve_rejoin_wal") == actions.index("promote") - 1
    recorder = Recorder(fail="promote")
    with pytest.raises(step_runner.StepFailed):
        step_runner.execute(steps, recorder, Reporter(), "hint")
    undone = recorder.calls[recorder.calls.index("promote") + 1 :]
    assert undone.index("drop_rejoin_reservation") < undone.index("unfence_and_start")


# --- repmgrd -----------------------------------------------------------------------------------
def test_repmgrd_is_paused_first_and_unpaused_last_or_on_any_failure(fleet):
    steps = plan_steps.with_repmgrd_paused(
        plan_steps.switchover_steps(fleet, "db1", "db2", ["db3"], DATABASES_ON_MAIN),
        on="db1",
        members=("db2", "db1", "db3"),
    )
    assert (steps[0].action, steps[0].args) == ("pause_repmgrd", ("db1",))
    assert steps[0].release == steps[-1] and steps[-1].action == "unpause_repmgrd"
    assert steps[-1].args == (("db2", "db1", "db3"),)
    assert plan_steps.with_repmgrd_paused([], on="db1", members=("db1",)) == []
    actions = Recorder(fail="promote")
    with pytest.raises(step_runner.StepFailed):
        step_runner.execute(steps, actions, Reporter(), "hint")
    assert actions.calls[0] == "pause_repmgrd" and "unpause_repmgrd" in actions.calls[actions.calls.index("promote") :]


def test_what_repmgr_service_pause_reached():
    output = (
        "NOTICE: node 1 (db1) paused\nWARNING: unable to connect to node 2\nNOTICE: node 3 (db3) not paused\n"
        "ERROR: unable to pause 2 node(s)\n"
    )
    assert repmgrd.repmgrd_pause_outcome(output, True) == (["db1"], ["node 2", "db3"])
    assert repmgrd.repmgrd_pause_outcome("NOTICE: node 1 (db1) unpaused\n", False) == (["db1"], [])
    assert repmgrd.repmgrd_pause_outcome("NOTICE: node 1 (db1) unpaused\n", True) == ([], [])


# --- whether the old primary may start again ---------------------------------------------------
def test_an_unreachable_candidate_is_unknown_never_a_standby():
    with pytest.raises(IgopsError, match="cannot tell whether db2 was promoted: ssh: connect to host"):
        primary_actions.candidate_verdict("db2", "main", None, False, None, "ssh: connect to host 10.0.0.22: timed out")
    with pytest.raises(IgopsError, match="its postmaster did not stop"):
        primary_actions.candidate_verdict("db2", "main", None, False, {"postmaster": "still running"}, None)


def test_a_promoted_candidate_or_one_out_of_recovery_blocks_the_undo():
    with pytest.raises(IgopsError, match="accepts writes"):
        primary_actions.candidate_verdict("db2", "main", False, True, None, None)
    for control in ("in production", "shut down", ""):
        with pytest.raises(IgopsError, match="not verifiably a standby"):
            primary_actions.candidate_verdict("db2", "main", None, True, {"stopped": "1", "control": control}, None)


def test_a_candidate_verified_in_recovery_lets_the_old_primary_start():
    assert "nobody asked" in primary_actions.candidate_verdict("db2", "main", True, False, None, None)
    verdict = primary_actions.candidate_verdict(
        "db2", "main", True, True, {"stopped": "1", "control": "in archive recovery"}, None
    )
    assert verdict == "db2 stopped by igops, in archive recovery, fenced"
    assert (
        primary_actions.candidate_verdict("db2", "main", None, True, {"control": "shut down in recovery"}, None)
        == "db2 is down, shut down in recovery, fenced"
    )


# --- the causes a failure names -----------------------------------------------------------------
REPMGR_CONF = """node_id = 2
service_start_command = '/usr/lib/postgresql/15/bin/pg_ctl -D /srv/db2/pgconf -l /srv/db2/log/postgresql.log -w start'
service_stop_command = '/usr/lib/postgresql/15/bin/pg_ctl -D /srv/db2/pgconf -m fast stop'
"""

PROMOTION_LOG = """2026-12-03 03:00:00.000 UTC [10] ERROR:  relation "x" does not exist
2026-12-03 03:10:00.000 UTC [20] LOG:  received promote request
2026-12-03 03:10:00.001 UTC [21] FATAL:  terminating walreceiver process due to administrator command
2026-12-03 03:10:00.002 UTC [20] LOG:  selected new timeline ID: 38
2026-12-03 03:10:00.003 UTC [20] PANIC:  could not write to file "pg_wal/xlogtemp.20": No space left on device
2026-12-03 03:10:00.004 UTC [9] LOG:  startup process (PID 20) was terminated by signal 6: Aborted
"""


def test_the_server_log_is_where_the_start_command_writes_it():
    assert postgres.log_file_of(REPMGR_CONF) == "/srv/db2/log/postgresql.log"
    assert postgres.log_file_of("service_start_command = 'systemctl start postgresql'\n") is None
    assert postgres.log_file_of("node_id = 1\n") is None


def test_the_cause_is_the_first_panic_since_the_promote_request():
    assert (
        postgres.log_cause(PROMOTION_LOG, since="received promote request")
        == 'PANIC: could not write to file "pg_wal/xlogtemp.20": No space left on device'
    )
    assert postgres.log_cause(PROMOTION_LOG.splitlines()[0]) == 'ERROR: relation "x" does not exist'
    assert postgres.log_cause("LOG:  database system is ready\n") is None


def test_free_space_below_the_threshold_on_either_volume_is_a_reason():
    df = (
        "Filesystem 1-blocks Used Available Capacity Mounted on\n"
        "/dev/loop3 469762048 80000000 389762048 18% /srv/db2/data\n"
        "/dev/loop4 469762048 468713472 1048576 100% /srv/db2/wal\n"
    )
    assert pg_plans.free_space_reasons("db2", df, 128 << 20) == [
        "db2's WAL volume (/srv/db2/wal) has 1 MiB free (threshold 128 MiB, [postgres] min_free_bytes)"
    ]
    assert len(pg_plans.free_space_reasons("db2", df, 400 << 20)) == 2
    assert pg_plans.free_space_reasons("db2", df, 0) == []


def test_a_failure_says_what_it_left():
    nodes = [
        failover.PgNode("db1", "10.0.0.21", "primary", "running", fenced=False),
        failover.PgNode("db2", "10.0.0.22", "unknown", "stopped", fenced=True, control_state="in archive recovery"),
    ]
    state = failover.PgClusterState("main", nodes, "db1", {"pgb1": {"main": "db1"}}, {})
    assert pg_cluster.describe_left_behind(state) == (
        "db1 is the primary; PgBouncer routes to db1 and is not paused; db2 is stopped (in archive recovery), fenced"
    )


# --- executing a plan ----------------------------------------------------------------------------
# The error a Recorder raises unless told otherwise: one instance, shared by every Recorder.
BOOM = IgopsError("boom")


class Recorder:
    """Actions that record their calls; `fail` names the one that raises."""

    def __init__(self, fail=None, error=BOOM):
        self.calls = []
        self.fail = fail
        self.error = error

    def __getattr__(self, name):
        def action(*args):
            self.calls.append(name)
            if name == self.fail:
                raise self.error

        return action


STEPS = [
    step_runner.Step("pause", "pause", release=step_runner.Step("resume", "resume")),
    step_runner.Step("stop", "stop", undo=step_runner.Step("start", "start")),
    step_runner.Step("promote", "promote", point_of_no_return=True),
    step_runner.Step("repoint", "repoint"),
]


def test_a_failure_before_the_point_of_no_return_undoes_then_releases():
    actions = Recorder(fail="stop")
    with pytest.raises(step_runner.StepFailed) as failed:
        step_runner.execute(STEPS, actions, Reporter(), "hint")
    assert actions.calls == ["pause", "stop", "start", "resume"]
    assert failed.value.number == 2 and not failed.value.past_point_of_no_return
    assert [item.outcome for item in failed.value.recovery] == ["undone", "released"]


def test_a_failure_from_the_point_of_no_return_on_only_releases():
    for failing in ("promote", "repoint"):
        actions = Recorder(fail=failing)
        with pytest.raises(step_runner.StepFailed) as failed:
            step_runner.execute(STEPS, actions, Reporter(), "hint")
        assert actions.calls[-1] == "resume" and "start" not in actions.calls
        assert failed.value.past_point_of_no_return


class Probed(Recorder):
    """A Recorder whose `took` probe answers `found` (or raises it, if an exception)."""

    def __init__(self, found, **kwargs):
        super().__init__(**kwargs)
        self.found = found

    def took(self, *args):
        self.calls.append("took")
        if isinstance(self.found, BaseException):
            raise self.found
        return self.found


PROBED = [
    STEPS[0],
    STEPS[1],
    step_runner.Step("promote", "promote", took_effect=step_runner.Step("out of recovery?", "took")),
    step_runner.Step("repoint", "repoint", point_of_no_return=True),
]


def test_a_step_found_to_have_taken_effect_rolls_forward_and_says_why():
    actions = Probed("db2 is out of recovery", fail="promote")
    with pytest.raises(step_runner.StepFailed) as failed:
        step_runner.execute(PROBED, actions, Reporter(), "hint")
    assert actions.calls == ["pause", "stop", "promote", "took", "resume"]
    assert failed.value.past_point_of_no_return
    assert [(item.outcome, item.detail) for item in failed.value.recovery][0] == (
        "took effect",
        "db2 is out of recovery",
    )
    assert "promote: took effect (db2 is out of recovery)" in str(failed.value)


def test_a_probe_that_cannot_tell_counts_as_taken_effect_and_one_that_found_nothing_undoes():
    actions = Probed(IgopsError("no route to db2"), fail="promote")
    with pytest.raises(step_runner.StepFailed) as failed:
        step_runner.execute(PROBED, actions, Reporter(), "hint")
    assert "start" not in actions.calls and failed.value.past_point_of_no_return
    assert "unknown whether it took effect (no route to db2)" in failed.value.recovery[0].detail
    actions = Probed("", fail="promote")
    with pytest.raises(step_runner.StepFailed) as failed:
        step_runner.execute(PROBED, actions, Reporter(), "hint")
    assert actions.calls == ["pause", "stop", "promote", "took", "start", "resume"]
    assert not failed.value.past_point_of_no_return


def test_a_probe_is_asked_of_the_last_step_started_even_when_it_ended():
    # A signal between the promotion's end and the repoint: the promotion happened, so the old
    # primary must not start again.
    actions = Probed("db2 is out of recovery")
    with pytest.raises(step_runner.StepFailed) as failed:
        step_runner.execute(SignalsBetween(PROBED, signal.SIGTERM, 3), actions, Reporter(), "hint")
    assert actions.calls == ["pause", "stop", "promote", "took", "resume"]
    assert failed.value.number == 3


class RefusesToBegin(Reporter):
    """A reporter under which the step titled `refused` cannot begin, as when the run's lease is
    lost or the journal refuses the step's intent entry."""

    def __init__(self, refused):
        super().__init__()
        self.refused = refused

    @contextmanager
    def step(self, title):
        if title == self.refused:
            raise IgopsError("the lease on cluster main was lost")
        with super().step(title) as record:
            yield record


def test_a_step_that_ended_is_probed_when_the_next_cannot_begin():
    # The promotion ended; the repoint cannot begin. The promotion happened, so nothing may be
    # undone (the old primary started again) and the run rolls forward.
    actions = Probed("db2 is out of recovery")
    with pytest.raises(step_runner.StepFailed) as failed:
        step_runner.execute(PROBED, actions, RefusesToBegin("repoint"), "hint")
    assert actions.calls == ["pause", "stop", "promote", "took", "resume"]
    assert failed.value.past_point_of_no_return
    assert (failed.value.recovery[0].title, failed.value.recovery[0].outcome) == ("promote", "took effect")
    # A step that never began is not probed: a lease lost before the promotion undoes the stop.
    actions = Probed("db2 is out of recovery")
    with pytest.raises(step_runner.StepFailed) as failed:
        step_runner.execute(PROBED, actions, RefusesToBegin("promote"), "hint")
    assert actions.calls == ["pause", "stop", "start", "resume"]
    assert not failed.value.past_point_of_no_return


def test_an_interrupt_is_recovered_from_like_a_failure():
    actions = Recorder(fail="stop", error=KeyboardInterrupt())
    with pytest.raises(step_runner.StepFailed, match="interrupted"):
        step_runner.execute(STEPS, actions, Reporter(), "hint")
    assert actions.calls == ["pause", "stop", "start", "resume"]


def test_a_failing_recovery_is_reported_and_the_rest_still_runs():
    class UndoFails(Recorder):
        def __getattr__(self, name):
            if name == "start":

                def start(*args):
                    self.calls.append("start")
                    raise IgopsError("cannot start")

                return start
            return super().__getattr__(name)

    actions = UndoFails(fail="stop")
    with pytest.raises(step_runner.StepFailed) as failed:
        step_runner.execute(STEPS, actions, Reporter(), "hint")
    assert actions.calls == ["pause", "stop", "start", "resume"]
    assert [(item.title, item.outcome) for item in failed.value.recovery] == [
        ("start", "undo failed"),
        ("resume", "released"),
    ]


class SignalsBetween(list):
    """Steps that send this process `signum` as the engine moves on to the step at `at`: between
    two steps, outside every step's own handling."""

    def __init__(self, steps, signum, at):
        super().__init__(steps)
        self.signum = signum
        self.at = at

    def __iter__(self):
        for index, step in enumerate(list.__iter__(self)):
            if index == self.at:
                os.kill(os.getpid(), self.signum)
            yield step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_between_two_steps_undoes_and_releases(signum):
    actions = Recorder()
    before = signal.getsignal(signum)
    with pytest.raises(step_runner.StepFailed, match="interrupted") as failed:
        step_runner.execute(SignalsBetween(STEPS, signum, at=2), actions, Reporter(), "hint")
    assert actions.calls == ["pause", "stop", "start", "resume"]
    assert [item.outcome for item in failed.value.recovery] == ["undone", "released"]
    assert signal.getsignal(signum) is before  # the handlers are put back


def test_a_signal_during_the_recovery_does_not_stop_it():
    class SignalledInUndo(Recorder):
        def __getattr__(self, name):
            action = super().__getattr__(name)
            if name != "start":
                return action

            def start(*args):
                action(*args)
                os.kill(os.getpid(), signal.SIGTERM)  # ignored: the recovery must finish
                self.calls.append("after the signal")

            return start

    actions = SignalledInUndo(fail="promote", error=KeyboardInterrupt())
    steps = [STEPS[0], STEPS[1], step_runner.Step("promote", "promote"), STEPS[3]]
    with pytest.raises(step_runner.StepFailed):
        step_runner.execute(steps, actions, Reporter(), "hint")
    assert actions.calls == ["pause", "stop", "promote", "start", "after the signal", "resume"]


def test_the_failure_message_ends_with_what_was_left():
    with pytest.raises(step_runner.StepFailed) as failed:
        step_runner.execute(STEPS, Recorder(fail="stop"), Reporter(), "hint", left_behind=lambda: "db1 is the primary")
    assert failed.value.message.endswith("— left: db1 is the primary")


def test_every_step_runs_in_order_when_nothing_fails():
    actions = Recorder()
    reports = step_runner.execute(STEPS, actions, Reporter(), "hint")
    assert actions.calls == ["pause", "stop", "promote", "repoint"]
    assert [report.outcome for report in reports] == ["ok"] * 4


# --- the commands ------------------------------------------------------------------------------------
def test_every_failover_command_offers_json_dry_run_and_accept_risk():
    for args in (
        ["pg", "switchover"],
        ["pg", "failover"],
        ["pg", "rejoin"],
        ["redis", "switchover"],
        ["redis", "failover"],
        ["redis", "rejoin"],
    ):
        text = run_igops(*args, "--help").stdout
        assert "--json" in text and "--dry-run" in text and "--accept-risk" in text and "--yes" in text, args
    for args in (["pg", "status"], ["redis", "status"]):
        assert "--json" in run_igops(*args, "--help").stdout


def test_unknown_cluster_and_node_are_usage_errors(tmp_path):
    path = tmp_path / "igops.toml"
    path.write_text(FLEET)
    result = run_igops("-c", str(path), "pg", "switchover", "nope", "--to", "db2", "--dry-run")
    assert result.returncode == ExitCode.USAGE and "unknown Postgres cluster 'nope'" in result.stderr
    result = run_igops("-c", str(path), "redis", "switchover", "--to", "db1", "--dry-run")
    assert result.returncode == ExitCode.USAGE and "db1 is not a Redis node" in result.stderr


@pytest.mark.parametrize(
    "edit,where",
    [
        (("[redis]\n", "[redis]\npause_timeout = 1\n"), "redis.pause_timeout"),  # less than a demote needs
        (("[redis]\n", '[redis]\nconfig_file = "/srv/{node}/redis.conf"\n'), "unknown placeholder {node}"),
        (("max_lag_seconds = 5", "max_lag_seconds = 0"), "postgres.max_lag_seconds"),
        (("[postgres]\n", "[pgbouncer]\npause_timeout = 0\n[postgres]\n"), "pgbouncer.pause_timeout"),
        # Below three heartbeats a late one could trip the watchdog.
        (("[postgres]\n", "[pgbouncer]\nwatchdog_deadline = 2\n[postgres]\n"), "pgbouncer.watchdog_deadline"),
        (("[postgres]\n", '[pgbouncer]\nwatchdog_deadline = "soon"\n[postgres]\n'), "pgbouncer.watchdog_deadline"),
    ],
)
def test_the_inventory_refuses_failover_settings_that_cannot_work(tmp_path, edit, where):
    path = tmp_path / "igops.toml"
    path.write_text(
        FLEET.replace(
            FLEET[FLEET.index("[redis]\nmaster") :], '[redis]\nmaster = "redis1"\nreplicas = ["redis2", "redis3"]\n'
        ).replace(*edit, 1)
    )
    result = run_igops("-c", str(path), "pg", "switchover", "main", "--to", "db2", "--dry-run")
    assert result.returncode == ExitCode.USAGE and result.stdout == ""
    assert where in result.stderr


def test_the_plan_title_names_each_risk_accepted():
    """--accept-risk's risks head the plan (stdout on a dry run) and the question confirmed."""
    from igops.commands.role_change_flow import _title

    plan = failover.PgPlan(
        "switchover",
        "main",
        "Switch cluster main over to db2",
        "db1",
        "db2",
        forced=["db2 has WAL replay paused", "db2 lags 300000 bytes (threshold 1048576)"],
    )
    assert _title(plan) == (
        "Switch cluster main over to db2, accepting the risks that db2 has WAL replay paused; "
        "that db2 lags 300000 bytes (threshold 1048576)"
    )
    plan.forced = []
    assert _title(plan) == "Switch cluster main over to db2"


def test_repmgrd_is_waited_for_where_it_runs_on_any_member_and_a_paused_one_counts_as_not_back():
    assert repmgrd.repmgrd_not_back({"db1": "not running", "db2": "not running"}) == []  # no repmgrd
    assert repmgrd.repmgrd_not_back({"db1": "not running", "db2": "running"}) == ["db1"]  # reconnecting
    assert repmgrd.repmgrd_not_back({"db1": "paused", "db2": "running", "db3": None}) == ["db1"]
    assert repmgrd.repmgrd_not_back({"db1": "running", "db2": "running"}) == []


def test_a_dump_that_reads_its_last_segment_to_the_end_ends_where_that_segment_does():
    printed = "-- last segment 000000030000000100000002\n"
    assert postgres.wal_end_from_waldump(printed, SEGMENT) == (1 << 32) + 3 * SEGMENT
    assert postgres.wal_end_from_waldump(printed + "pg_waldump: error: out of memory", SEGMENT) is None


def test_repmgr_node_check_refuses_on_a_failing_check_and_only_notes_an_archive_backlog():
    from igops.pg.plans import node_check_findings

    output = (
        'Node "db2":\n'
        "\tServer role: OK (node is standby)\n"
        "\tReplication lag: CRITICAL (912 seconds, critical threshold: 600))\n"
        "\tWAL archiving: WARNING (17 pending archive ready files (threshold: 16))\n"
        "\tDownstream servers: OK (this node has no downstream nodes)\n"
    )
    failing, notes = node_check_findings(output)
    assert failing == ["Replication lag: CRITICAL (912 seconds, critical threshold: 600))"]
    assert notes == ["WAL archiving: WARNING (17 pending archive ready files (threshold: 16))"]
    assert node_check_findings('Node "db2":\n\tServer role: OK (node is standby)\n') == ([], [])


def test_a_rejoin_puts_back_its_own_archive_command_only_where_archiving_is_set_up():
    """pg_rewind copies the source's postgresql.auto.conf, archive_command included."""
    from igops.pg.plan_steps import rejoin_steps

    plain = [step.action for step in rejoin_steps("db1", "db2", running=False)]
    archiving = [step.action for step in rejoin_steps("db1", "db2", running=False, archiving=True)]
    assert "restore_archive_command" not in plain
    assert archiving[-3:] == ["rejoin", "restore_archive_command", "wait_streaming"]


def test_a_plan_whose_state_changed_is_refused_under_the_lock_naming_the_change(monkeypatch):
    """check_unchanged's refusal itself, for both kinds of plan: the view is read again and its
    signature compared (the views are stood in for: what they hold is the live clusters')."""
    from types import SimpleNamespace

    from igops import failover
    from igops.pg.plans import PgPlan
    from igops.redis_failover import RedisPlan

    views = {"pg": SimpleNamespace(state="pg state"), "redis": SimpleNamespace(state="redis state")}
    signatures = {id(views["pg"]): (("db2", "streaming"),), id(views["redis"]): (("redis2", "master"),)}
    monkeypatch.setattr(failover, "pg_view", lambda fleet, cluster: views["pg"])
    monkeypatch.setattr(failover, "redis_view", lambda fleet: views["redis"])
    monkeypatch.setattr(
        failover.pg_plans, "signature", lambda view, settling=None, rejoining=None: signatures[id(view)]
    )
    monkeypatch.setattr(failover.redis_failover, "signature", lambda view, settling=None: signatures[id(view)])
    for plan in (PgPlan("switchover", "main", "t", "db1", "db2"), RedisPlan("switchover", "t", "redis1", "redis2")):
        plan.signature = signatures[id(views["pg" if isinstance(plan, PgPlan) else "redis"])]
        failover.check_unchanged(None, plan)  # unchanged: nothing said
        plan.signature = (("db2", "not streaming"),)
        with pytest.raises(failover.Refused) as refused:
            failover.check_unchanged(None, plan)
        assert refused.value.message.startswith("refused: the state changed since the plan was made (was [")
        assert refused.value.state in ("pg state", "redis state")


def test_a_plan_refused_for_a_changed_state_says_what_changed():
    from igops.failover import what_changed

    before = ((("db1", "primary", "running"), ("db2", "standby", "running")), (("pgb1", (("main", "db1"),)),), ())
    now = ((("db1", "primary", "running"), ("db2", "standby", "starting")), (("pgb1", (("main", "db1"),)),), ())
    assert what_changed(before, now) == "was [('db2', 'standby', 'running')], now [('db2', 'standby', 'starting')]"
    assert what_changed((), now) == "no earlier state to compare"


def test_a_standby_repmgr_still_records_otherwise_is_a_problem_the_finish_registers(fleet):
    """A former primary that follows the new one while repmgr's record still calls it primary:
    repmgr's own checks refuse to work with it, so status says so and the finish registers it."""
    nodes = [
        failover.PgNode(
            "db2", "10.0.0.22", "primary", "running", timeline=2, repmgr="primary", pgbouncer=["pgb1:main"]
        ),
        failover.PgNode(
            "db1", "10.0.0.21", "standby", "running", timeline=2, streaming_from="db2", repmgr="primary (inactive)"
        ),
    ]
    state = failover.PgClusterState("main", nodes, "db2", {"pgb1": {"main": "db2"}}, {})
    problems = pg_cluster.pg_problems(fleet, state, ["db2"], view_with({}))
    assert "repmgr does not record db1 as the standby of db2 it is" in problems
    view = pg_cluster.PgView(fleet, "main", {}, {}, {}, [])
    view.state = state
    plan = pg_plans._plan_pg_finish(view, "db2")
    actions = [(step.action, step.args) for step in plan.actions]
    assert ("register_standby", ("db1", "db2")) in actions
    # ... and drops a WAL reservation for db2's rejoin that a rolled-back run may have left on db1.
    assert actions.index(("drop_rejoin_reservation", ("db1", "db2"))) > actions.index(
        ("register_standby", ("db1", "db2"))
    )
    nodes[1].repmgr = "standby of db2"
    assert [s.action for s in pg_plans._plan_pg_finish(view, "db2").actions] == []
