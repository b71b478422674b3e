"""A group in use and a plan gone stale: a restore, drill or in-place rebuild leases the group it
reads, which delete refuses and prune leaves (with its cluster's WAL); prune, delete and keep
read the groups again under their lease and refuse a plan that no longer holds. On the local
lease backend, with EC2's snapshots faked."""

from datetime import UTC, datetime, timedelta

import pytest

from igops import (
    coordination,
    inventory,
    restore,
    snapshot_drill,
    snapshot_groups,
    snapshot_policy,
    snapshot_prune,
    snapshot_wal,
)
from igops.errors import AlreadyRunning, RefusedError
from igops.operations import conflicts, engine, journal
from igops.operations.engine import OperationSpec
from igops.operations.steps import Step
from igops.output import Reporter
from igops.pg import archive_repository
from igops.restore_target import TIME, RecoveryTarget
from tests.unit.inventories import unit_inventory

NOW = datetime.now(UTC)


class FakeEbs:
    """EC2's snapshots as igops reads and changes them."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, group_id, host, hours_ago, *, volumes=1, ebs_state="completed", kept=None, wal=None):
        for index in range(volumes):
            tags = {
                snapshot_groups.TAG_GROUP: group_id,
                snapshot_groups.TAG_HOST: host,
                snapshot_groups.TAG_GROUP_SIZE: str(volumes),
                snapshot_groups.TAG_STATE: snapshot_groups.STATE_COMPLETE,
                snapshot_groups.TAG_MOUNT: f"/data{index}",
                **({snapshot_groups.TAG_KEEP: kept} if kept else {}),
                **(wal.tags() if wal else {}),
            }
            self.items.append(
                {
                    "SnapshotId": f"snap-{group_id}-{index}",
                    "VolumeId": f"vol-{host}-{index}",
                    "State": ebs_state,
                    "StartTime": NOW - timedelta(hours=hours_ago),
                    "VolumeSize": 1,
                    "Tags": [{"Key": key, "Value": value} for key, value in tags.items()],
                }
            )
        return group_id

    def snapshots(self, filters):
        def matches(item):
            tags = {tag["Key"]: tag["Value"] for tag in item["Tags"]}
            return all(key in tags if value is None else tags.get(key) == value for key, value in filters.items())

        return [item for item in self.items if matches(item)]

    def delete_snapshot(self, snapshot_id):
        self.items = [item for item in self.items if item["SnapshotId"] != snapshot_id]

    def tag(self, ids, tags):
        for item in self.items:
            if item["SnapshotId"] in ids:
                kept = [tag for tag in item["Tags"] if tag["Key"] not in tags]
                item["Tags"] = kept + [{"Key": key, "Value": value} for key, value in tags.items()]

    def untag(self, ids, keys):
        for item in self.items:
            if item["SnapshotId"] in ids:
                item["Tags"] = [tag for tag in item["Tags"] if tag["Key"] not in keys]

    def volumes(self, filters):
        return []

    def group_ids(self):
        return {group.group_id for group in snapshot_groups.groups(self)}


@pytest.fixture
def fleet(tmp_path):
    hosts = [("db1", "127.0.21.1", "postgres"), ("db2", "127.0.21.2", "postgres"), ("db9", "127.0.21.9", "app")]
    sections = '[postgres.clusters.main]\nprimary = "db1"\nstandbys = ["db2"]\n[snapshot]\nminimum_redundancy = 2\n'
    path = unit_inventory(tmp_path, hosts, sections=sections)
    text = path.read_text()
    for index, name in enumerate(("db1", "db2")):
        text = text.replace(
            f'name = "{name}"\n', f'name = "{name}"\ninstance_id = "i-{index:04x}"\nmounts = [{{path = "/data"}}]\n', 1
        )
    path.write_text(text)
    return inventory.load_file(path)


def keep_last(count, fleet, groups):
    sets = snapshot_policy.data_sets(fleet)
    rules = snapshot_policy.prune_rules(sets, snapshot_policy.Retention(last=count))
    return snapshot_policy.plan_prune(groups, *rules, datetime.now(UTC), timedelta(hours=1))


def run_as(fleet, kind, resources, action):
    """`action(reporter)` run as an operation of `kind` on the local backend, as mutate runs it."""
    spec = OperationSpec(kind, f"{kind} test", ["all"], resources, [])
    return engine.perform(fleet, spec, lambda operation: action(operation.reporter), Reporter())


def restore_plan(group_id, onto="db9"):
    return restore.RestorePlan(group_id, "db2", onto, "i-0002", "/mnt/r", {}, {}, None)


def reading(fleet, resources, kind="snapshot-restore"):
    """The leases a running restore holds (another process, as far as the lease files go)."""
    holder = coordination.current_holder(kind, "db9", f"igops snapshot {kind[9:]} … --onto db9", None, "op-reading")
    return coordination.for_fleet(fleet).lease(resources, holder)


# --- a group in use -------------------------------------------------------------------------------
def test_a_restore_a_drill_and_an_in_place_rebuild_lease_the_group_they_read():
    assert restore_plan("g1").resources() == [conflicts.host("db9"), snapshot_groups.in_use("g1")]
    drill = snapshot_drill.DrillPlan("main", "db9", RecoveryTarget(TIME, time=NOW), True, NOW, NOW, restore_plan("g1"))
    assert snapshot_groups.in_use("g1") in drill.resources()
    from igops import restore_in_place

    rebuild = restore_in_place.RebuildPlan("rebuild", "main", "Rebuild db2", "db1", "db1", group="g1")
    assert restore_in_place.resources(rebuild) == [conflicts.pg_cluster("main"), snapshot_groups.in_use("g1")]


def test_prune_leaves_a_group_a_restore_reads_and_the_wal_its_cluster_needs(fleet, monkeypatch):
    ebs = FakeEbs()

    def mark(start):
        label = f"START WAL LOCATION: 0/0 (file {start})\n"
        return snapshot_wal.WalMark("main", "0/0", "0/1", 1, label, NOW)

    oldest = ebs.add("g-oldest", "db2", 30, wal=mark("000000010000000000000001"))
    middle = ebs.add("g-middle", "db2", 20, wal=mark("000000010000000000000002"))
    ebs.add("g-newer", "db2", 15, wal=mark("000000010000000000000003"))
    ebs.add("g-newest", "db2", 10, wal=mark("000000010000000000000004"))
    archived = ["000000010000000000000001", "000000010000000000000002", "000000010000000000000003"]

    def plan_expiry(fleet, remaining):
        """The repository's answer: the archived files before the oldest start a group left has."""
        needed = archive_repository.oldest_needed("main", remaining)
        files = [name for name in archived if needed and name < needed.segment]
        return [archive_repository.WalExpiry("main", needed, files, len(files))] if files else []

    monkeypatch.setattr(archive_repository, "plan_expiry", plan_expiry)
    expired = []
    monkeypatch.setattr(archive_repository, "expire", lambda fleet, plans, reporter: expired.extend(plans))

    groups = snapshot_groups.groups(ebs)
    plan = archive_repository.for_prune(fleet, groups, keep_last(1, fleet, groups))
    assert [group.group_id for group in plan.delete] == [oldest, middle]
    assert [expiry.cluster for expiry in plan.wal] == ["main"] and len(plan.wal[0].keys) == 2
    assert plan.notes() == [snapshot_policy.IN_USE_NOTE]

    with reading(fleet, restore_plan(oldest).resources()):
        result = run_as(
            fleet,
            "snapshot-prune",
            [conflicts.SNAPSHOTS],
            lambda reporter: snapshot_prune.prune(fleet, ebs, plan, reporter),
        )
    assert result.deleted == [middle] and list(result.in_use) == [oldest]
    assert "snapshot-restore op-reading" in result.in_use[oldest]
    assert oldest in ebs.group_ids(), "the group the restore reads is still there"
    assert expired == [], "nor is the WAL it replays expired"
    [record] = journal.LocalJournal(fleet.state_dir).records()
    results = [e for e in journal.LocalJournal(fleet.state_dir).entries(record["id"]) if e["event"] == "result"]
    assert [entry["status"] for entry in results] == ["skipped", "ok", "skipped"]
    assert result.summary() == f"deleted 1 group; left {oldest}, in use"

    # Once the restore has ended, the next prune deletes it, and the WAL only it needed.
    groups = snapshot_groups.groups(ebs)
    again = archive_repository.for_prune(fleet, groups, keep_last(1, fleet, groups))
    result = run_as(
        fleet,
        "snapshot-prune",
        [conflicts.SNAPSHOTS],
        lambda reporter: snapshot_prune.prune(fleet, ebs, again, reporter),
    )
    assert result.deleted == [oldest] and not result.in_use and [e.cluster for e in expired] == ["main"]


def test_delete_is_refused_while_a_drill_reads_the_group(fleet):
    ebs = FakeEbs()
    for hours in (30, 20, 10):
        ebs.add(f"g-{hours}", "db2", hours)
    plan = snapshot_policy.plan_delete(fleet, snapshot_groups.groups(ebs), "g-30", NOW)
    assert snapshot_groups.in_use("g-30") in plan.resources()
    with reading(fleet, restore_plan("g-30").resources(), kind="snapshot-drill"):
        with pytest.raises(AlreadyRunning, match="snapshot-group g-30 is held by snapshot-drill"):
            run_as(fleet, "snapshot-delete", plan.resources(), lambda _: snapshot_prune.delete(fleet, ebs, plan))
    assert "g-30" in ebs.group_ids()
    assert (
        run_as(fleet, "snapshot-delete", plan.resources(), lambda _: snapshot_prune.delete(fleet, ebs, plan)) == "g-30"
    )
    assert "g-30" not in ebs.group_ids()


def test_a_restore_or_drill_refuses_a_group_deleted_between_its_plan_and_its_lease(fleet):
    ebs = FakeEbs()
    ebs.add("g1", "db2", 5)
    plan = restore_plan("g1")
    ebs.delete_snapshot("snap-g1-0")
    with pytest.raises(RefusedError, match=r"snapshot group g1 changed since the plan was made \(it is gone\)"):
        restore.restore(fleet, ebs, plan)
    drill = snapshot_drill.DrillPlan("main", "db9", RecoveryTarget(TIME, time=NOW), True, NOW, NOW, plan)
    with pytest.raises(RefusedError, match="it is gone") as refused:
        snapshot_drill.run_drill(fleet, ebs, drill)
    assert refused.value.hint == "run the command again to see the new plan"


def test_an_in_place_rebuild_refuses_a_group_gone_only_while_it_has_volumes_to_make(fleet, monkeypatch):
    from igops import failover, restore_in_place

    ebs = FakeEbs()
    monkeypatch.setattr("igops.ebs.Ebs", lambda fleet: ebs)
    applied = []
    monkeypatch.setattr(failover, "apply_pg", lambda fleet, plan, reporter: applied.append(plan) or "done")
    swap = Step("create a volume from snap-g1-0", "volume_from_group", ("db2", "/data", "snap-g1-0", "g1"))
    plan = restore_in_place.RebuildPlan("rebuild", "main", "Rebuild db2", "db1", "db1", group="g1", actions=[swap])
    with pytest.raises(RefusedError, match="it is gone"):
        restore_in_place.apply(fleet, plan)
    assert applied == []
    start = Step("db2: start it", "start_standby", ("db2",))
    rerun = restore_in_place.RebuildPlan("rebuild", "main", "Rebuild db2", "db1", "db1", group="g1", actions=[start])
    assert restore_in_place.apply(fleet, rerun) == "done", "its volumes made, a rerun needs the group no more"


# --- a plan gone stale ----------------------------------------------------------------------------
def test_prune_refuses_when_a_group_it_deletes_was_pinned_after_the_plan(fleet):
    ebs = FakeEbs()
    for hours in (30, 20, 10):
        ebs.add(f"g-{hours}", "db2", hours)
    plan = keep_last(2, fleet, snapshot_groups.groups(ebs))
    assert [group.group_id for group in plan.delete] == ["g-30"]
    # Another operator pins it while this one reads the plan.
    ebs.tag(["snap-g-30-0"], {snapshot_groups.TAG_KEEP: "2026-12-01T00:00:00+00:00 by b@ops"})
    with pytest.raises(RefusedError) as refused:
        snapshot_prune.prune(fleet, ebs, plan)
    assert refused.value.message == (
        "refused: the snapshot groups changed since the plan was made (group g-30 is kept now (kept)): "
        "nothing was deleted"
    )
    assert ebs.group_ids() == {"g-10", "g-20", "g-30"}


def test_prune_refuses_when_another_delete_left_its_set_at_the_minimum_redundancy(fleet):
    ebs = FakeEbs()
    for hours in (40, 30, 20, 10):
        ebs.add(f"g-{hours}", "db2", hours)
    plan = keep_last(1, fleet, snapshot_groups.groups(ebs))
    assert [group.group_id for group in plan.delete] == ["g-40", "g-30"] and "g-20" in plan.keep
    ebs.delete_snapshot("snap-g-20-0")  # `snapshot delete g-20` by another operator, meanwhile
    with pytest.raises(RefusedError, match=r"\(group g-30 is kept now \(minimum redundancy 2\)\)"):
        snapshot_prune.prune(fleet, ebs, plan)
    assert ebs.group_ids() == {"g-10", "g-30", "g-40"}


def test_prune_runs_as_planned_when_the_groups_now_let_it_delete_more(fleet):
    ebs = FakeEbs()
    for hours in (30, 20, 10):
        ebs.add(f"g-{hours}", "db2", hours)
    ebs.add("g-new", "db1", 0.1, ebs_state="pending")  # EC2 still copying: it counts once complete
    plan = keep_last(2, fleet, snapshot_groups.groups(ebs))
    assert [group.group_id for group in plan.delete] == ["g-30"]
    for item in ebs.items:
        item["State"] = "completed"
    assert snapshot_prune.prune(fleet, ebs, plan).deleted == ["g-30"]
    assert ebs.group_ids() == {"g-new", "g-10", "g-20"}, "what it may delete now is the next prune's"


def test_wal_a_group_left_needs_now_is_not_expired():
    needed = archive_repository.Needed("000000010000000000000003", "g-newest")
    planned = [archive_repository.WalExpiry("main", needed, ["k1", "k2"], 2)]
    now = [archive_repository.WalExpiry("main", archive_repository.Needed("000000010000000000000002", "g-b"), ["k1"])]
    plan = snapshot_policy.PrunePlan(
        {}, [], planned, made_with=snapshot_policy.PruneInputs(lambda group: None, {}, timedelta())
    )
    assert plan.wal_changes(now) == ["main's WAL before 000000010000000000000003 is needed now"]
    assert plan.wal_changes([]) == ["main's WAL before 000000010000000000000003 is needed now"]
    assert plan.wal_changes(planned) == []


def test_two_deletes_planned_together_cannot_take_a_set_below_its_minimum_redundancy(fleet):
    ebs = FakeEbs()
    for hours in (30, 20, 10):
        ebs.add(f"g-{hours}", "db2", hours)
    every = snapshot_groups.groups(ebs)
    first = snapshot_policy.plan_delete(fleet, every, "g-30", NOW)
    second = snapshot_policy.plan_delete(fleet, every, "g-20", NOW)
    assert first.risks == second.risks == [], "each alone leaves 2 complete groups"
    assert (
        run_as(fleet, "snapshot-delete", first.resources(), lambda _: snapshot_prune.delete(fleet, ebs, first))
        == "g-30"
    )
    with pytest.raises(RefusedError) as refused:
        run_as(fleet, "snapshot-delete", second.resources(), lambda _: snapshot_prune.delete(fleet, ebs, second))
    assert refused.value.message == (
        "refused: snapshot group g-20 changed since the plan was made (it would leave 1 complete group of "
        "Postgres cluster main, below its minimum redundancy of 2): nothing was deleted"
    )
    assert ebs.group_ids() == {"g-10", "g-20"}


def test_delete_refuses_a_group_pinned_since_its_plan_even_with_its_risks_accepted(fleet):
    ebs = FakeEbs()
    for hours in (20, 10):
        ebs.add(f"g-{hours}", "db2", hours)
    plan = snapshot_policy.plan_delete(fleet, snapshot_groups.groups(ebs), "g-20", NOW, accept_risk=True)
    assert plan.risks and plan.steps()[0].startswith("RISK ACCEPTED: it would leave 1 complete group")
    ebs.tag(["snap-g-20-0"], {snapshot_groups.TAG_KEEP: "x by b@ops"})
    with pytest.raises(RefusedError, match=r"\(group g-20 is kept now \(x by b@ops\)\): nothing was deleted"):
        snapshot_prune.delete(fleet, ebs, plan)
    assert ebs.group_ids() == {"g-10", "g-20"}


def test_keep_refuses_when_the_pin_changed_since_the_plan(fleet):
    ebs = FakeEbs()
    ebs.add("g1", "db2", 5)
    [read] = snapshot_groups.groups(ebs)
    snapshot_prune.set_keep(ebs, read, "then by b@ops")  # another operator's keep, first
    with pytest.raises(RefusedError, match=r"group g1 is kept now \(then by b@ops\)\): nothing was tagged"):
        snapshot_prune.set_keep(ebs, read, "now by a@ops")
    assert snapshot_groups.groups(ebs)[0].kept == "then by b@ops"
    [pinned] = snapshot_groups.groups(ebs)
    snapshot_prune.set_keep(ebs, pinned, None)
    with pytest.raises(RefusedError, match="group g1 was released"):
        snapshot_prune.set_keep(ebs, pinned, None)
