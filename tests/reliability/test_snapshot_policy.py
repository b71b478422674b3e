"""The backup policy against the lab: keep and release, delete and its refusals, a group a restore
reads (refused to delete, left by prune), `snapshot cron` (due sets taken once each on a standby or
replica, quiet when nothing is due, silent while another run holds its lease, pruning that
honours kept groups and minimum redundancy), and the snapshot check judged per set of data
against the schedule."""

import json
import re
import time
from datetime import UTC, datetime, timedelta

import pytest

from igops import postgres_admin, redisops, snapshot_groups, snapshot_prune
from igops.ebs import Ebs
from igops.errors import ExitCode
from tests.conftest import run_igops
from tests.reliability.test_snapshot_under_faults import group_snapshots, standby_of_main

pytestmark = pytest.mark.lab


def policy_inventory(lab, tmp_path, name="policy.toml", **values) -> str:
    """The lab inventory with [snapshot] policy keys replaced (schedule, keep_daily, …)."""
    text = lab.source.read_text()
    for key, value in values.items():
        rendered = json.dumps(value) if isinstance(value, str) else str(value)
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {rendered}", text, count=1)
        assert count == 1, f"the lab inventory has no {key}"
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def create_on(config: str, host: str) -> str:
    created = run_igops("-c", config, "snapshot", "create", host, "--yes", "--json")
    assert created.returncode == 0, created.stdout + created.stderr
    return json.loads(created.stdout)["data"]["group_id"]


def listed(config: str) -> dict[str, dict]:
    result = run_igops("-c", config, "snapshot", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {group["group_id"]: group for group in json.loads(result.stdout)["data"]["groups"]}


def followers(lab) -> dict[str, str]:
    """set of data -> its member that a cron run should snapshot, asked of the servers."""
    found = {}
    for cluster in ("main", "pg2"):
        primary = postgres_admin.primary_of(lab, cluster).name
        members = [lab.model.postgres.clusters[cluster].primary, *lab.model.postgres.clusters[cluster].standbys]
        [standby] = [name for name in members if name != primary]
        found[cluster] = standby
    redis_members = [lab.model.redis.master, *lab.model.redis.replicas]
    [replica] = [name for name in redis_members if redisops.probe(lab, name)[1].role == "replica"]
    found["redis"] = replica
    return found


def a_slot_after(groups: list) -> datetime:
    """The start of a minute after every group began, waited for if it has not come yet: a
    schedule on whole minutes has had a slot since the newest group then. Only a group begun in
    the last minute costs a wait: none when the tests before took none (this module runs after
    the shard moves, which take no group)."""
    newest = max(group.taken_for for group in groups)  # what cron and the check judge a slot by
    slot = newest.replace(second=0, microsecond=0) + timedelta(minutes=1)
    wait = (slot - datetime.now(UTC)).total_seconds() + 0.5
    if wait > 0:
        time.sleep(wait)
    return slot


def every_minute_without_grace(lab, tmp_path) -> str:
    """A copy of the lab inventory whose sets are due every minute, and whose check allows no
    grace: in a minute in which no group was taken, the check flags every set."""
    config = policy_inventory(lab, tmp_path, name="every-minute.toml", schedule="every 1m")
    with open(config, "a") as extra:
        extra.write("\n[check]\nsnapshot_grace_minutes = 0\n")
    return config


def assert_the_check_flags_every_set_as_missed(config: str) -> None:
    checked = run_igops("-c", config, "check", "--only", "snapshot", "--json", "--timeout", "60")
    results = {result["target"]: result for result in json.loads(checked.stdout)["data"]["results"]}
    assert set(results) == {"main", "pg2", "redis"}
    for result in results.values():
        assert result["status"] in ("WARNING", "CRITICAL") and "is `igops snapshot cron` running?" in result["summary"]


def test_the_check_flags_each_missed_set_then_cron_takes_it_once_on_a_standby_prunes_by_policy_then_is_quiet(
    lab, tmp_path
):
    """Both halves need a minute that began after the newest group of every set (schedules are
    on whole minutes): one such minute serves the check first and cron then."""
    from igops import snapshot_policy

    ebs = Ebs(lab)
    standby = standby_of_main(lab)
    data_sets = {data_set.name: data_set for data_set in snapshot_policy.data_sets(lab)}
    members = {name for data_set in data_sets.values() for name in data_set.members}
    main = data_sets["main"]
    # A set with no complete group at all is CRITICAL for that, not for a missed slot: each has one.
    # Main has at least three, so that with cron's new one the minimum redundancy matters; the
    # oldest is pinned.
    complete = [group for group in snapshot_groups.groups(ebs) if group.state == snapshot_groups.STATE_COMPLETE]
    for data_set in data_sets.values():
        if not any(data_set.holds(group) for group in complete):
            create_on(str(lab.source), followers(lab)[data_set.name])
    for _ in range(3 - sum(main.holds(group) for group in complete)):
        create_on(str(lab.source), standby)
    groups = [group for group in snapshot_groups.groups(ebs) if group.host in members]
    pinned = min(
        (group for group in groups if main.holds(group) and group.state == snapshot_groups.STATE_COMPLETE),
        key=lambda group: group.created,
    ).group_id
    kept = run_igops("-c", str(lab.source), "snapshot", "keep", pinned, "--yes")
    assert kept.returncode == 0, kept.stderr
    try:
        slot = a_slot_after(groups)
        assert_the_check_flags_every_set_as_missed(every_minute_without_grace(lab, tmp_path))

        config = policy_inventory(
            lab,
            tmp_path,
            schedule=f"every 1d at {slot:%H:%M}",
            keep_daily=1,
            keep_weekly=0,
            keep_monthly=0,
            minimum_redundancy=3,
        )
        ran = run_igops("-c", config, "snapshot", "cron", "--yes", "--json", timeout=300)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        report = json.loads(ran.stdout)["data"]
        assert sorted(report["due"]) == ["main", "pg2", "redis"] and report["failed"] == []
        expected = followers(lab)
        assert {take["set"]: take["host"] for take in report["taken"]} == expected
        assert {take["set"]: take["why"] for take in report["taken"]} == {
            "main": "streaming standby",
            "pg2": "streaming standby",
            "redis": "linked replica",
        }
        groups = {group.group_id: group for group in snapshot_groups.groups(ebs)}
        for take in report["taken"]:
            assert groups[take["group_id"]].state == snapshot_groups.STATE_COMPLETE
            assert groups[take["group_id"]].created >= slot

        # Prune: per set, the newest (today's only daily), the pinned group, and one more for a
        # minimum redundancy of 3; nothing else of main survives.
        main_members = {lab.model.postgres.clusters["main"].primary, *lab.model.postgres.clusters["main"].standbys}
        left = [
            group
            for group in groups.values()
            if group.host in main_members and group.state == snapshot_groups.STATE_COMPLETE
        ]
        newest_main = next(take["group_id"] for take in report["taken"] if take["set"] == "main")
        assert report["keep"][newest_main][:2] == ["newest complete", "daily"]
        assert report["keep"][pinned] == ["kept"]
        assert len(left) == 3 and {newest_main, pinned} <= {group.group_id for group in left}
        assert (
            "minimum redundancy 3"
            in report["keep"][next(g.group_id for g in left if g.group_id not in (newest_main, pinned))]
        )
        assert report["deleted"], "the lab had more groups of its sets than the policy keeps"

        # Nothing is due now, and nothing more to prune: not a byte of output.
        again = run_igops("-c", config, "snapshot", "cron", "--yes")
        assert (again.returncode, again.stdout, again.stderr) == (0, "", "")

        # The check: every set OK against its schedule.
        checked = run_igops("-c", config, "check", "--only", "snapshot", "--json", "--timeout", "60")
        results = {result["target"]: result for result in json.loads(checked.stdout)["data"]["results"]}
        assert set(results) == {"main", "pg2", "redis"}, results
        for result in results.values():
            assert result["status"] == "OK" and "as `every 1d at" in result["summary"], result
    finally:
        run_igops("-c", str(lab.source), "snapshot", "keep", pinned, "--release", "--yes")


def test_keep_pins_a_group_against_prune_and_delete_until_released(lab, tmp_path):
    config = str(lab.source)
    standby = standby_of_main(lab)
    pinned = create_on(config, standby)
    newer = create_on(config, standby)
    try:
        planned = run_igops("-c", config, "snapshot", "keep", pinned, "--dry-run")
        assert planned.returncode == 0 and "igops:keep=" in planned.stdout, planned.stdout + planned.stderr
        assert listed(config)[pinned]["kept"] is None, "a dry run changes nothing"

        kept = run_igops("-c", config, "snapshot", "keep", pinned, "--yes", "--json")
        assert kept.returncode == 0, kept.stderr
        assert re.match(r"\d{4}-\d\d-\d\dT.* by \S+@\S+", listed(config)[pinned]["kept"])
        table = run_igops("-c", config, "snapshot", "list", "--host", standby)
        assert re.search(rf"{pinned}\s.*\skept\s*$", table.stdout, re.M), table.stdout

        refused = run_igops("-c", config, "snapshot", "delete", pinned, "--yes")
        assert refused.returncode == ExitCode.REFUSED, refused.stdout + refused.stderr
        assert "is kept" in refused.stderr and f"igops snapshot keep {pinned} --release" in refused.stderr
        assert "--accept-risk" in refused.stderr and group_snapshots(lab, pinned)

        # Keep only the newest of the cluster: the pinned group stays, for being pinned.
        pruning = run_igops(
            "-c", config, "snapshot", "prune", "--keep-last", "1", "--host", standby, "--dry-run", "--json"
        )
        assert pruning.returncode == 0, pruning.stderr
        data = json.loads(pruning.stdout)["data"]
        assert data["keep"][pinned] == ["kept"] and newer in data["keep"] and pinned not in data["delete"]
    finally:
        released = run_igops("-c", config, "snapshot", "keep", pinned, "--release", "--yes")
    assert released.returncode == 0, released.stderr
    assert listed(config)[pinned]["kept"] is None

    planned = run_igops("-c", config, "snapshot", "delete", pinned, "--dry-run")
    assert planned.returncode == 0, planned.stderr
    snapshot_ids = [item["SnapshotId"] for item in group_snapshots(lab, pinned)]
    assert snapshot_ids and all(f"DeleteSnapshot {item}" in planned.stdout for item in snapshot_ids)
    deleted = run_igops("-c", config, "snapshot", "delete", pinned, "--yes", "--json")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert json.loads(deleted.stdout)["data"]["deleted"] == [pinned]
    assert group_snapshots(lab, pinned) == []


def test_delete_refuses_to_go_below_minimum_redundancy_unless_the_risk_is_accepted(lab, tmp_path):
    config = policy_inventory(lab, tmp_path, minimum_redundancy=1000)
    victim = create_on(config, standby_of_main(lab))
    refused = run_igops("-c", config, "snapshot", "delete", victim, "--yes", "--json")
    assert refused.returncode == ExitCode.REFUSED, refused.stdout + refused.stderr
    error = json.loads(refused.stdout)["error"]
    assert "below its minimum redundancy of 1000" in error["message"] and "Postgres cluster main" in error["message"]
    assert "--accept-risk" in error["hint"] and group_snapshots(lab, victim)

    planned = run_igops("-c", config, "snapshot", "delete", victim, "--accept-risk", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert re.search(
        r"1\. RISK ACCEPTED: it would leave \d+ complete groups of Postgres cluster main", planned.stdout
    ), planned.stdout
    deleted = run_igops("-c", config, "snapshot", "delete", victim, "--accept-risk", "--yes")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert group_snapshots(lab, victim) == []
    unknown = run_igops("-c", config, "snapshot", "delete", victim, "--yes")
    assert unknown.returncode == ExitCode.USAGE and "no snapshot group" in unknown.stderr


def test_a_cron_run_while_another_holds_the_lease_does_nothing_and_says_nothing(lab, tmp_path):
    from igops import inventory, snapshot_cron

    config = policy_inventory(lab, tmp_path, schedule="every 1m")
    fleet = inventory.load_file(tmp_path / "policy.toml")
    before = set(listed(config))
    with snapshot_cron.lease(fleet, "igops snapshot cron (a run still working)") as held:
        assert held
        busy = run_igops("-c", config, "snapshot", "cron", "--yes")
        assert (busy.returncode, busy.stdout, busy.stderr) == (0, "", "")
        told = run_igops("-c", config, "snapshot", "cron", "--yes", "--json")
        assert told.returncode == 0 and json.loads(told.stdout)["data"]["busy"] is True
    assert set(listed(config)) == before, "a run that found the lease held took no group"


def test_a_group_a_restore_reads_is_refused_to_delete_and_left_by_prune_until_the_restore_ends(lab, tmp_path):
    from igops import coordination, snapshot_policy
    from igops.operations import conflicts, engine
    from igops.output import Reporter

    config = str(lab.source)
    standby = standby_of_main(lab)
    read, newer = create_on(config, standby), create_on(config, standby)
    ebs = Ebs(lab)
    # Retention of the two alone: `read` is the one to go (the prune made again under its lease
    # may find more to delete, which it leaves for the next prune).
    two = [group for group in snapshot_groups.groups(ebs, standby) if group.group_id in (read, newer)]
    rules = {"two": snapshot_policy.SetRetention(snapshot_policy.Retention(last=1), 1)}
    plan = snapshot_policy.plan_prune(
        two, lambda group: "two" if group.host == standby else None, rules, datetime.now(UTC), timedelta(hours=1)
    )
    assert [group.group_id for group in plan.delete] == [read]
    spec = engine.OperationSpec("snapshot-prune", "prune test", ["all"], [conflicts.SNAPSHOTS], plan.steps())

    def prune(operation):
        return snapshot_prune.prune(lab, ebs, plan, operation.reporter)

    # What a restore (or drill, or in-place rebuild) of `read` holds while it runs.
    holder = coordination.current_holder("snapshot-restore", "scratch", "igops snapshot restore …", None, "op-x")
    with coordination.for_fleet(lab).lease([snapshot_groups.in_use(read)], holder):
        refused = run_igops("-c", config, "snapshot", "delete", read, "--accept-risk", "--yes", "--json")
        assert refused.returncode == ExitCode.LOCKED, refused.stdout + refused.stderr
        assert f"snapshot-group {read} is held by snapshot-restore" in json.loads(refused.stdout)["error"]["message"]
        left = engine.perform(lab, spec, prune, Reporter())
        assert left.deleted == [] and "snapshot-restore op-x" in left.in_use[read]
        assert group_snapshots(lab, read), "the group a restore reads is not deleted"
    pruned = engine.perform(lab, spec, prune, Reporter())
    assert pruned.deleted == [read] and group_snapshots(lab, read) == []
    deleted = run_igops("-c", config, "snapshot", "delete", newer, "--accept-risk", "--yes")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
