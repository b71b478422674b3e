"""Groups as igops.snapshot_groups reads them from moto's EC2 run in this process.

Snapshots carrying a group's tag that are none of its members (strays): EC2 made them for a call
whose answer was lost, or of a volume attached after the plan. A complete group stays complete;
its strays are never restored, and are deleted with it. And when a group counts as taken for a
schedule: by the clock of the machine that took it, within reason."""

from datetime import UTC, datetime, timedelta

import pytest

from igops import snapshot_groups
from igops.ebs import Ebs
from igops.inventory import load_file
from tests.unit.in_process import moto_endpoint
from tests.unit.inventories import unit_inventory


@pytest.fixture(scope="module")
def endpoint():
    with moto_endpoint() as url:
        yield url


@pytest.fixture
def ebs(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unit")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit")
    inventory = unit_inventory(
        tmp_path,
        [("db9", "127.0.0.1", "app")],
        sections=f'[aws]\nregion = "us-east-1"\nendpoint_url = "{endpoint}"\n',
    )
    return Ebs(load_file(inventory))


def take(ebs: Ebs, group_id: str, volumes: list[str], complete: bool) -> list[str]:
    """One snapshot per volume, tagged as a create tags them at the call (and complete after)."""
    common = {snapshot_groups.TAG_GROUP: group_id, snapshot_groups.TAG_HOST: "db9", snapshot_groups.TAG_GROUP_SIZE: "2"}
    made = [ebs.create_snapshot(volume, f"igops {group_id} db9", common) for volume in volumes]
    if complete:
        for index, snapshot_id in enumerate(made):
            ebs.tag(
                [snapshot_id],
                {snapshot_groups.TAG_MOUNT: f"/data{index}", snapshot_groups.TAG_STATE: snapshot_groups.STATE_COMPLETE},
            )
    return made


def volumes(ebs: Ebs, count: int) -> list[str]:
    return [ebs._ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"] for _ in range(count)]


def test_a_complete_group_with_a_stray_is_complete_and_its_stray_is_no_member(ebs):
    group_id = "db9-strays-1"
    data = volumes(ebs, 2)
    [lost] = take(ebs, group_id, data[:1], complete=False)  # the call whose answer was lost
    members = take(ebs, group_id, data, complete=True)
    [group] = snapshot_groups.groups(ebs, group_id=group_id)
    assert group.state == snapshot_groups.STATE_COMPLETE
    assert snapshot_groups.snapshot_ids(group) == set(members) and group.volumes == group.expected == 2
    assert [stray["SnapshotId"] for stray in group.strays] == [lost]
    steps = snapshot_groups.delete_steps(group, [])
    assert len(steps) == 3 and lost in steps[-1] and "stray" in steps[-1]
    snapshot_groups.delete_group(ebs, group)
    assert snapshot_groups.groups(ebs, group_id=group_id) == []


def test_before_the_group_is_marked_complete_more_snapshots_than_expected_is_failed(ebs):
    group_id = "db9-strays-2"
    data = volumes(ebs, 2)
    take(ebs, group_id, data[:1], complete=False)
    take(ebs, group_id, data, complete=False)
    [group] = snapshot_groups.groups(ebs, group_id=group_id)
    assert group.state == snapshot_groups.STATE_FAILED and group.volumes == 3 and not group.strays


def test_a_group_still_taking_is_taking(ebs):
    group_id = "db9-strays-3"
    take(ebs, group_id, volumes(ebs, 1), complete=False)
    [group] = snapshot_groups.groups(ebs, group_id=group_id)
    assert group.state == snapshot_groups.STATE_TAKING and not group.strays


def test_a_group_counts_for_a_schedule_from_when_the_machine_that_took_it_began_it(ebs):
    """The igops:created tag is read as the group's `begun`; a reading further from EC2's clock
    than MAX_CLOCK_SKEW, or none that parses, leaves EC2's."""
    fast, wrong, unreadable = (volumes(ebs, 1) for _ in range(3))
    ahead = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=90)
    for group_id, volume, created in (
        ("db9-clock-fast", fast, ahead.isoformat()),
        ("db9-clock-wrong", wrong, (ahead + timedelta(days=300)).isoformat()),
        ("db9-clock-unreadable", unreadable, "soon"),
    ):
        [snapshot_id] = take(ebs, group_id, volume, complete=False)
        ebs.tag([snapshot_id], {snapshot_groups.TAG_CREATED: created})
    [fast_group] = snapshot_groups.groups(ebs, group_id="db9-clock-fast")
    assert fast_group.begun == ahead and fast_group.taken_for == ahead > fast_group.created
    [wrong_group] = snapshot_groups.groups(ebs, group_id="db9-clock-wrong")
    assert wrong_group.begun is not None and wrong_group.taken_for == wrong_group.created
    [unreadable_group] = snapshot_groups.groups(ebs, group_id="db9-clock-unreadable")
    assert unreadable_group.begun is None and unreadable_group.taken_for == unreadable_group.created
