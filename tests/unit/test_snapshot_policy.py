"""The snapshot policy as pure logic: schedules, sets of data and their policies from the
inventory, when a set is due, GFS retention with kept groups and minimum redundancy, what a
delete risks, and the snapshot check's verdict per set."""

import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from igops import inventory, schedule, snapshot_groups, snapshot_policy
from igops.checks.snapshots import verdict
from igops.errors import ConfigError, NagiosStatus
from tests.unit.inventories import unit_inventory

NOW = datetime(2026, 11, 23, 12, 40, tzinfo=UTC)  # a Monday
GRACE = timedelta(hours=1)


def group(host, hours_ago, state="complete", kept=None, now=NOW, name=None):
    return snapshot_groups.SnapshotGroup(
        name or f"{host}-{hours_ago}", host, ["/data"], 1, 1, state, now - timedelta(hours=hours_ago), 1, 5.0, kept=kept
    )


# --- schedules ----------------------------------------------------------------------------------
def test_schedule_grid_is_anchored_to_the_day_in_utc():
    every_6h = schedule.parse("every 6h")
    assert every_6h.latest_slot(NOW) == datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    shifted = schedule.parse("Every 6h at 01:30")
    assert shifted.latest_slot(NOW) == datetime(2026, 11, 23, 7, 30, tzinfo=UTC)
    nightly = schedule.parse("every 1d at 03:00")
    assert nightly.latest_slot(NOW) == datetime(2026, 11, 23, 3, 0, tzinfo=UTC)
    late = schedule.parse("every 1d at 23:00")  # before today's 23:00: yesterday's
    assert late.latest_slot(NOW) == datetime(2026, 11, 22, 23, 0, tzinfo=UTC)
    assert schedule.parse("every 15m").latest_slot(NOW) == datetime(2026, 11, 23, 12, 30, tzinfo=UTC)
    assert schedule.parse("every 30 min").interval == timedelta(minutes=30)
    exact = datetime(2026, 11, 23, 18, 0, tzinfo=UTC)
    assert every_6h.latest_slot(exact) == exact


def test_due_once_per_slot_and_once_after_an_outage():
    every_6h = schedule.parse("every 6h")
    assert every_6h.due(None, NOW)
    assert not every_6h.due(datetime(2026, 11, 23, 12, 0, 5, tzinfo=UTC), NOW)
    assert every_6h.due(datetime(2026, 11, 23, 11, 59, tzinfo=UTC), NOW)
    # Three days without a group: one group is due now, not one per missed slot.
    assert every_6h.due(NOW - timedelta(days=3), NOW)
    assert not every_6h.due(NOW, NOW + timedelta(hours=1))


@pytest.mark.parametrize(
    "text, words",
    [
        ("every 7h", "does not divide a day"),
        ("every 2d", "does not divide a day"),
        ("every 0h", "zero interval"),
        ("6h", "not understood"),
        ("every 6 hours", "not understood"),
        ("0 3 * * *", "not understood"),
        ("every 1d at 24:00", "not a time of day"),
        ("every 1d at 03:75", "not a time of day"),
    ],
)
def test_unreadable_schedules_say_how_to_write_one(text, words):
    with pytest.raises(schedule.ScheduleError) as caught:
        schedule.parse(text)
    assert words in caught.value.problem and caught.value.fix


def test_a_set_is_due_by_its_newest_taken_group_counting_pending_and_running_creates():
    data_set = snapshot_policy.DataSet(
        "cluster", "main", ("db1", "db2"), snapshot_policy.Policy(schedule.parse("every 6h"))
    )
    old = [group("db2", 7)]
    assert snapshot_policy.due(data_set, old, NOW, GRACE)
    assert not snapshot_policy.due(data_set, old + [group("db1", 0.5)], NOW, GRACE), "any member's group counts"
    assert not snapshot_policy.due(data_set, old + [group("db2", 0.2, "pending")], NOW, GRACE)
    assert not snapshot_policy.due(data_set, old + [group("db2", 0.1, "taking")], NOW, GRACE), "a create may be running"
    assert snapshot_policy.due(data_set, old + [group("db2", 0.5, "failed")], NOW, GRACE)
    assert snapshot_policy.due(data_set, old + [group("db3", 0.1)], NOW, GRACE), "db3 is not a member"
    unscheduled = snapshot_policy.DataSet("host", "media1", ("media1",))
    assert not snapshot_policy.due(unscheduled, [], NOW, GRACE)


def test_a_group_a_machine_with_a_fast_clock_took_counts_for_the_slot_it_took_it_for():
    """Its cron took the 12:00 group at 12:00:10 by its clock, 11:58:40 by EC2's: cron on a machine
    with a right clock must not take a second group for 12:00."""
    data_set = snapshot_policy.DataSet(
        "cluster", "main", ("db1", "db2"), snapshot_policy.Policy(schedule.parse("every 1h"))
    )
    ec2_clock = datetime(2026, 11, 23, 11, 58, 40, tzinfo=UTC)
    taken = group("db2", (NOW - ec2_clock).total_seconds() / 3600)
    assert taken.created == ec2_clock
    assert snapshot_policy.due(data_set, [taken], NOW, GRACE), "no tag: EC2's clock"
    taken.begun = datetime(2026, 11, 23, 12, 0, 10, tzinfo=UTC)
    assert not snapshot_policy.due(data_set, [taken], NOW, GRACE)
    taken.begun = ec2_clock + snapshot_groups.MAX_CLOCK_SKEW + timedelta(seconds=1)
    assert snapshot_policy.due(data_set, [taken], NOW, GRACE), "a clock that wrong is not trusted"


# --- inventory ----------------------------------------------------------------------------------
FLEET = """
[postgres.clusters.main]
primary = "db1"
standbys = ["db2"]
[redis]
master = "redis1"
replicas = ["redis2"]
"""


def fleet_inventory(tmp_path, snapshot_tables=""):
    hosts = [
        ("db1", "127.0.20.1", "postgres"),
        ("db2", "127.0.20.2", "postgres"),
        ("redis1", "127.0.20.3", "redis"),
        ("redis2", "127.0.20.4", "redis"),
        ("media1", "127.0.20.5", "app"),
        ("web1", "127.0.20.6", "app"),
    ]
    path = unit_inventory(tmp_path, hosts, sections=FLEET + snapshot_tables)
    text = path.read_text()
    # Every host but web1 has a data mount and an instance.
    for index, (name, *_rest) in enumerate(hosts[:5]):
        text = text.replace(
            f'name = "{name}"\n', f'name = "{name}"\ninstance_id = "i-{index:04x}"\nmounts = [{{path = "/data"}}]\n', 1
        )
    path.write_text(text)
    return path


def test_policies_per_cluster_redis_set_and_host_fall_back_to_the_default(tmp_path):
    fleet = inventory.load_file(
        fleet_inventory(
            tmp_path,
            """
[snapshot]
schedule = "every 6h"
keep_daily = 7
keep_weekly = 4
minimum_redundancy = 2
[snapshot.clusters.main]
schedule = "every 1h"
keep_hourly = 24
[snapshot.redis]
keep_daily = 3
[snapshot.hosts.media1]
schedule = "every 1d at 03:00"
minimum_redundancy = 0
""",
        )
    )
    sets = {data_set.name: data_set for data_set in snapshot_policy.data_sets(fleet)}
    assert list(sets) == ["main", "redis", "media1"], "web1 has nothing to snapshot"
    assert sets["main"].kind == "cluster" and sets["main"].members == ("db1", "db2")
    assert sets["main"].policy.schedule.text == "every 1h"
    assert sets["main"].policy.retention == snapshot_policy.Retention(hourly=24, daily=7, weekly=4)
    assert sets["main"].policy.minimum_redundancy == 2
    assert sets["redis"].members == ("redis1", "redis2") and sets["redis"].policy.schedule.text == "every 6h"
    assert sets["redis"].policy.retention == snapshot_policy.Retention(daily=3, weekly=4)
    assert sets["media1"].policy.minimum_redundancy == 0 and sets["media1"].policy.schedule.at_minutes == 180
    assert snapshot_policy.set_of(list(sets.values()), "db2") is sets["main"]
    assert snapshot_policy.set_of(list(sets.values()), "web1") is None


def test_without_a_policy_nothing_is_scheduled_and_every_group_is_kept(tmp_path):
    fleet = inventory.load_file(fleet_inventory(tmp_path))
    for data_set in snapshot_policy.data_sets(fleet):
        assert data_set.policy == snapshot_policy.Policy()
        assert data_set.policy.retention.empty() and data_set.policy.minimum_redundancy == 1


def test_policy_mistakes_are_reported_together_with_their_fix(tmp_path):
    path = fleet_inventory(
        tmp_path,
        """
[snapshot]
schedule = "every 7h"
keep_daily = -1
[snapshot.clusters.mian]
keep_daily = 3
[snapshot.hosts.db2]
keep_daily = 3
[snapshot.hosts.redis2]
keep_daily = 3
[snapshot.hosts.web1]
keep_daily = 3
[snapshot.hosts.nobody]
keep_daily = 3
[snapshot.redis]
schedule = "daily"
""",
    )
    with pytest.raises(ConfigError) as caught:
        inventory.load_file(path)
    problems = {problem.where: f"{problem.problem} — {problem.fix}" for problem in caught.value.problems}
    assert "does not divide a day" in problems["snapshot.schedule"]
    assert "at least 0" in problems["snapshot.keep_daily"]
    assert "not understood" in problems["snapshot.redis.schedule"] and "every 6h" in problems["snapshot.redis.schedule"]
    assert (
        "undefined cluster 'mian'" in problems["snapshot.clusters.mian"]
        and "'main'" in problems["snapshot.clusters.mian"]
    )
    assert "[snapshot.clusters.main]" in problems["snapshot.hosts.db2"]
    assert "[snapshot.redis]" in problems["snapshot.hosts.redis2"]
    assert "no data mounts" in problems["snapshot.hosts.web1"]
    assert "undefined host 'nobody'" in problems["snapshot.hosts.nobody"]


# --- retention ----------------------------------------------------------------------------------
def plan(groups, retention, minimum_redundancy=1, grace=GRACE, now=NOW):
    rules = {"main": snapshot_policy.SetRetention(retention, minimum_redundancy)}
    key = lambda g: "main" if g.host in ("db1", "db2") else None  # noqa: E731
    return snapshot_policy.plan_prune(groups, key, rules, now, grace)


def test_gfs_keeps_the_newest_of_each_period_across_every_member_of_the_set():
    # One group a day for 100 days, taken on db2, then on db1 after a switchover.
    groups = [group("db2" if day > 10 else "db1", 24 * day + 0.2) for day in range(100)]
    kept = plan(groups, snapshot_policy.Retention(daily=7, weekly=4, monthly=3))
    assert [g.group_id for g in groups[:7]] == [g for g in kept.keep if "daily" in kept.keep[g]]
    weekly = [g for g in kept.keep if "weekly" in kept.keep[g]]
    monthly = [g for g in kept.keep if "monthly" in kept.keep[g]]
    assert len(weekly) == 4 and len(monthly) == 3
    # The newest group of November, October and September 2026.
    assert [groups[0].created.month] + [
        next(x for x in groups if x.group_id == g).created.month for g in monthly[1:]
    ] == [11, 10, 9]
    assert len(kept.delete) == 100 - len(kept.keep)
    assert all(g.group_id not in kept.keep for g in kept.delete)


def test_monthly_buckets_are_calendar_months():
    groups = [
        group("db1", 0, name="nov"),
        group("db1", 24 * 23, name="oct-31"),
        group("db1", 24 * 24, name="oct-30"),
        group("db1", 24 * 60, name="sep"),
    ]
    kept = plan(groups, snapshot_policy.Retention(monthly=2))
    assert kept.keep == {"nov": ["newest complete", "monthly"], "oct-31": ["monthly"]}
    assert [g.group_id for g in kept.delete] == ["sep", "oct-30"]


def test_kept_groups_are_never_pruned_and_minimum_redundancy_holds_a_floor():
    groups = [
        group("db2", 1),
        group("db2", 30, kept="2026-11-01T00:00:00+00:00 by root@ops"),
        group("db2", 50),
        group("db1", 70),
        group("db2", 90, "failed", kept="x"),
    ]
    kept = plan(groups, snapshot_policy.Retention(last=1), minimum_redundancy=3)
    assert kept.keep["db2-1"] == ["newest complete", "last"]
    assert kept.keep["db2-30"] == ["kept"]
    assert kept.keep["db2-50"] == ["minimum redundancy 3"], "kept counts toward the floor: 1 more makes 3"
    assert kept.keep["db2-90"] == ["kept"], "a kept group stays even when stale"
    assert [g.group_id for g in kept.delete] == ["db1-70"]


def test_an_empty_retention_keeps_every_complete_group_and_clears_stale_leftovers():
    groups = [group("db2", 1), group("db2", 400), group("db2", 3, "taking"), group("db2", 0.5, "taking")]
    kept = plan(groups, snapshot_policy.Retention())
    assert set(kept.keep) == {"db2-1", "db2-400"}
    assert [g.group_id for g in kept.delete] == ["db2-3"]


def test_groups_of_sets_without_rules_are_left_alone():
    kept = plan(
        [group("db1", 1), group("db1", 2), group("web1", 3), group("web1", 4)], snapshot_policy.Retention(last=1)
    )
    assert [g.group_id for g in kept.delete] == ["db1-2"]


def test_prune_rules_follow_each_sets_policy_or_the_counts_given_for_every_set():
    main = snapshot_policy.DataSet(
        "cluster",
        "main",
        ("db1", "db2"),
        snapshot_policy.Policy(retention=snapshot_policy.Retention(last=1), minimum_redundancy=2),
    )
    groups = [group("db1", 1), group("db2", 2), group("db2", 3), group("gone1", 4), group("gone1", 5)]
    by_policy = snapshot_policy.plan_prune(groups, *snapshot_policy.prune_rules([main]), NOW, GRACE)
    assert [g.group_id for g in by_policy.delete] == ["db2-3"], "a host in no set is left alone"
    assert by_policy.keep["db2-2"] == ["minimum redundancy 2"]
    counts = snapshot_policy.Retention(last=1)
    by_counts = snapshot_policy.plan_prune(groups, *snapshot_policy.prune_rules([main], counts), NOW, GRACE)
    assert [g.group_id for g in by_counts.delete] == ["gone1-5", "db2-3"]


# --- delete -------------------------------------------------------------------------------------
def test_delete_risks_name_kept_running_and_the_redundancy_floor():
    cluster = snapshot_policy.DataSet("cluster", "main", ("db1", "db2"), snapshot_policy.Policy(minimum_redundancy=2))
    newest, older, oldest = group("db2", 1), group("db2", 5, kept="x"), group("db1", 9)
    siblings = [newest, older, oldest]
    assert snapshot_policy.delete_risks(oldest, siblings, cluster, NOW, GRACE) == []
    risks = snapshot_policy.delete_risks(older, siblings, cluster, NOW, GRACE)
    assert risks == [f"group {older.group_id} is kept (pinned by `igops snapshot keep`)"]
    two = [newest, oldest]
    [floor] = snapshot_policy.delete_risks(newest, two, cluster, NOW, GRACE)
    assert floor == "it would leave 1 complete group of Postgres cluster main, below its minimum redundancy of 2"
    running = group("db2", 0.1, "taking")
    assert "still being taken" in snapshot_policy.delete_risks(running, two + [running], cluster, NOW, GRACE)[0]
    assert snapshot_policy.delete_risks(group("db2", 3, "taking"), two, cluster, NOW, GRACE) == []
    # Without a set (a host no longer in the inventory) the last complete group is still protected.
    lone = group("gone1", 2)
    assert "below its minimum redundancy of 1" in snapshot_policy.delete_risks(lone, [lone], None, NOW, GRACE)[0]
    lax = snapshot_policy.DataSet("host", "media1", ("media1",), snapshot_policy.Policy(minimum_redundancy=0))
    only = group("media1", 2)
    assert snapshot_policy.delete_risks(only, [only], lax, NOW, GRACE), "the last group always needs --accept-risk"


# --- the check's verdict ------------------------------------------------------------------------
THRESHOLDS = SimpleNamespace(snapshot_grace_minutes=60, snapshot_warning_hours=26, snapshot_critical_hours=50)


def judged(data_set, groups, now=NOW):
    return verdict(data_set, groups, now, GRACE, THRESHOLDS)


def test_a_cluster_is_backed_up_when_any_member_has_a_fresh_group():
    every_6h = snapshot_policy.DataSet(
        "cluster", "main", ("db1", "db2"), snapshot_policy.Policy(schedule.parse("every 6h"))
    )
    # 12:40 now, 1 h grace: the 06:00 group is the one that must exist; 12:00's may still be coming.
    ok = judged(every_6h, [group("db2", 6.5)])
    assert ok.status == NagiosStatus.OK and "(on db2)" in ok.summary and "every 6h" in ok.summary
    missed = judged(every_6h, [group("db2", 7)])
    assert missed.status == NagiosStatus.WARNING and "1 scheduled group missing" in missed.summary
    assert "2026-11-23 06:00 UTC" in missed.summary and "snapshot cron" in missed.summary
    assert judged(every_6h, [group("db2", 13)]).status == NagiosStatus.CRITICAL
    assert judged(every_6h, [group("db1", 13), group("db1", 1)]).status == NagiosStatus.OK, "the primary's counts"
    assert judged(every_6h, [group("db3", 1)]).status == NagiosStatus.CRITICAL, "another cluster's does not"
    empty = judged(every_6h, [group("db2", 1, "pending")])
    assert (
        empty.status == NagiosStatus.CRITICAL and "no complete snapshot group of Postgres cluster main" in empty.summary
    )
    assert (ok.warning_hours, ok.critical_hours) == (7, 13)


def test_without_a_schedule_the_age_thresholds_apply():
    redis = snapshot_policy.DataSet("redis", "redis", ("redis1", "redis2"))
    assert judged(redis, [group("redis2", 25)]).status == NagiosStatus.OK
    assert judged(redis, [group("redis1", 27)]).status == NagiosStatus.WARNING
    late = judged(redis, [group("redis2", 51)])
    assert late.status == NagiosStatus.CRITICAL and "2.1 days old" in late.summary


def test_stale_leftovers_warn_and_are_named():
    host = snapshot_policy.DataSet("host", "media1", ("media1",), snapshot_policy.Policy(schedule.parse("every 1d")))
    found = judged(host, [group("media1", 1), group("media1", 5, "taking", name="left-1")])
    assert found.status == NagiosStatus.WARNING and "1 stale group" in found.summary and "left-1" in found.summary


# --- the commands' refusals that need no fleet -------------------------------------------------
def test_cron_and_prune_without_any_policy_say_what_to_set(tmp_path):
    from tests.conftest import run_igops

    config = str(fleet_inventory(tmp_path))
    cron = run_igops("-c", config, "snapshot", "cron", "--yes", "--json")
    assert cron.returncode == 2, cron.stdout + cron.stderr
    error = json.loads(cron.stdout)["error"]
    assert "schedules nothing" in error["message"] and 'schedule (e.g. "every 6h")' in error["hint"]
    prune = run_igops("-c", config, "snapshot", "prune", "--yes")
    assert prune.returncode == 2 and "no retention given" in prune.stderr and "--keep-monthly" in prune.stderr


def test_a_cron_run_that_finds_the_lease_held_exits_0_in_silence(tmp_path):
    from igops import snapshot_cron
    from tests.conftest import run_igops

    path = fleet_inventory(tmp_path, '[snapshot]\nschedule = "every 1m"\n')
    with snapshot_cron.lease(inventory.load_file(path), "igops snapshot cron (still working)") as held:
        assert held
        busy = run_igops("-c", str(path), "snapshot", "cron", "--yes")
        assert (busy.returncode, busy.stdout, busy.stderr) == (0, "", "")
        told = run_igops("-c", str(path), "-v", "snapshot", "cron", "--yes")
        assert told.returncode == 0 and "still working: nothing to do" in told.stderr
        with snapshot_cron.lease(inventory.load_file(path), "a third") as third:
            assert third is False
