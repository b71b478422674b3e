"""Snapshot planning without a fleet: block-device discovery parsers on recorded host output,
volume mapping, retention, and the restore script."""

import shlex
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from igops import restore_scripts, snapshot, snapshot_groups, snapshot_policy, snapshot_volumes
from igops.agent import blockdevs
from igops.ebs import Attachment
from igops.errors import RefusedError

RECORDINGS = Path(__file__).parent / "recordings"


def test_mdstat_members_in_raid_order():
    arrays = blockdevs.parse_mdstat((RECORDINGS / "mdstat.txt").read_text())
    assert arrays["md0"] == {
        "level": "raid0",
        "members": [("nvme1n1", 0), ("nvme2n1", 1), ("nvme3n1", 2), ("nvme4n1", 3)],
    }
    assert arrays["md1"]["level"] == "raid10"
    assert [name for name, _ in arrays["md1"]["members"]] == ["xvdj", "xvdk", "xvdl", "xvdm"]


def test_mdadm_detail_orders_by_raid_device_not_number():
    detail = blockdevs.parse_mdadm_detail((RECORDINGS / "mdadm-detail-md0.txt").read_text())
    assert detail["level"] == "raid0" and detail["uuid"] == "3a2b1c0d:4e5f6a7b:8c9d0e1f:2a3b4c5d"
    assert detail["members"] == [("nvme1n1", 0), ("nvme2n1", 1), ("nvme4n1", 2), ("nvme3n1", 3)]


def test_nvme_serials_map_devices_to_volumes():
    entries = [
        tuple(part.strip() for part in line.split("->")) for line in (RECORDINGS / "by-id.txt").read_text().splitlines()
    ]
    volumes = blockdevs.parse_by_id(entries)
    assert volumes["nvme0n1"] == "vol-0123456789abcdef0"
    assert volumes["nvme4n1"] == "vol-0aaaaaaaaaaaaaaa4"
    assert "nvme0n1p1" not in volumes and "nvme6n1" not in volumes


def test_mountinfo_parser():
    text = (
        "36 35 98:0 / /var/lib/postgresql rw,noatime shared:1 - xfs /dev/md0 rw,attr2\n"
        "37 35 7:3 / /srv/with\\040space rw - xfs /dev/loop3 rw\n"
    )
    mounts = blockdevs.parse_mountinfo(text)
    assert mounts["/var/lib/postgresql"] == ("/dev/md0", "xfs")
    assert mounts["/srv/with space"] == ("/dev/loop3", "xfs")


@dataclass
class FakeMount:
    path: str
    volumes: list = field(default_factory=list)


@dataclass
class FakeHost:
    name: str = "db1"
    instance_id: str = "i-0abc"
    mounts: list = field(default_factory=list)


def raid_entry(volume_ids=(None, None, None, None)):
    return {
        "mount": "/var/lib/postgresql",
        "fstype": "xfs",
        "raid": {"level": "raid0", "uuid": None, "members": 4},
        "members": [
            {"device": f"/dev/nvme{i + 1}n1", "raid_index": i, "volume_id": v} for i, v in enumerate(volume_ids)
        ],
    }


ATTACHED = [Attachment("vol-root", "/dev/xvda", 8, True)] + [
    Attachment(f"vol-0aaaaaaaaaaaaaaa{i}", f"/dev/sd{'fghi'[i - 1]}", 1000, False) for i in range(1, 5)
]


def test_map_volumes_from_nvme_serials_keeps_raid_order():
    ids = [f"vol-0aaaaaaaaaaaaaaa{i}" for i in (1, 2, 3, 4)]
    targets = snapshot_volumes.map_volumes(FakeHost(), [raid_entry(ids)], ATTACHED)
    assert [(t.raid_index, t.volume_id) for t in targets] == list(enumerate(ids))
    assert all(t.raid_members == 4 and t.raid_level == "raid0" for t in targets)


def test_map_volumes_from_inventory_list_wins():
    ids = [f"vol-0aaaaaaaaaaaaaaa{i}" for i in (4, 3, 2, 1)]
    host = FakeHost(mounts=[FakeMount("/var/lib/postgresql", ids)])
    targets = snapshot_volumes.map_volumes(host, [raid_entry()], ATTACHED)
    assert [t.volume_id for t in targets] == ids


def test_map_volumes_by_attachment_device_name_with_xen_alias():
    entry = {
        "mount": "/data",
        "fstype": "xfs",
        "raid": None,
        "members": [{"device": "/dev/xvdg", "raid_index": 0, "volume_id": None}],
    }
    [target] = snapshot_volumes.map_volumes(FakeHost(), [entry], ATTACHED)
    assert target.volume_id == "vol-0aaaaaaaaaaaaaaa2"


def test_unknown_device_is_refused_before_any_freeze():
    entry = {
        "mount": "/data",
        "fstype": "xfs",
        "raid": None,
        "members": [{"device": "/dev/xvdz", "raid_index": 0, "volume_id": None}],
    }
    with pytest.raises(RefusedError, match="not a known EBS volume"):
        snapshot_volumes.map_volumes(FakeHost(), [entry], ATTACHED)


def test_volume_of_another_instance_is_refused():
    entry = {
        "mount": "/data",
        "fstype": "xfs",
        "raid": None,
        "members": [{"device": "/dev/nvme9n1", "raid_index": 0, "volume_id": "vol-0ffffffffffffffff"}],
    }
    with pytest.raises(RefusedError, match="not attached"):
        snapshot_volumes.map_volumes(FakeHost(), [entry], ATTACHED)


def test_root_volume_is_refused():
    entry = {
        "mount": "/data",
        "fstype": "xfs",
        "raid": None,
        "members": [{"device": "/dev/xvda", "raid_index": 0, "volume_id": None}],
    }
    with pytest.raises(RefusedError, match="root"):
        snapshot_volumes.map_volumes(FakeHost(), [entry], ATTACHED)


def test_member_count_mismatch_is_refused():
    host = FakeHost(mounts=[FakeMount("/var/lib/postgresql", ["vol-0aaaaaaaaaaaaaaa1"])])
    with pytest.raises(RefusedError, match="4 member devices"):
        snapshot_volumes.map_volumes(host, [raid_entry()], ATTACHED)


def group(host, hours_ago, state="complete", now=datetime(2026, 11, 23, 12, 0, tzinfo=UTC)):
    created = now - timedelta(hours=hours_ago)
    return snapshot_groups.SnapshotGroup(f"{host}-{hours_ago}", host, ["/data"], 2, 2, state, created, 2, 10.0)


NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def by_host(retention, grace=timedelta(hours=1), now=NOW):
    """plan_prune with each host its own set, as for hosts in no cluster."""
    rules = defaultdict(lambda: snapshot_policy.SetRetention(retention))
    return lambda groups: snapshot_policy.plan_prune(groups, lambda g: g.host, rules, now, grace)


def test_prune_keep_last():
    groups = [group("db1", h) for h in range(6)]
    plan = by_host(snapshot_policy.Retention(last=2))(groups)
    assert set(plan.keep) == {"db1-0", "db1-1"}
    assert [g.group_id for g in plan.delete] == ["db1-5", "db1-4", "db1-3", "db1-2"]


def test_prune_hourly_daily_weekly_buckets():
    now = datetime(2026, 11, 23, 12, 40, tzinfo=UTC)  # a Monday
    groups = [group("db1", h, now=now) for h in (0, 0.5, 1, 2, 24, 25, 48, 24 * 8, 24 * 15)]
    plan = by_host(snapshot_policy.Retention(hourly=2, daily=3, weekly=3), now=now)(groups)
    assert plan.keep["db1-0"] == ["newest complete", "hourly", "daily", "weekly"]
    assert "db1-0.5" not in plan.keep  # same hour as db1-0, and older
    assert plan.keep["db1-1"] == ["hourly"]
    assert plan.keep["db1-24"] == ["daily", "weekly"]  # Sunday: the previous ISO week
    assert plan.keep["db1-48"] == ["daily"]
    assert plan.keep[f"db1-{24 * 8}"] == ["weekly"]
    assert f"db1-{24 * 15}" not in plan.keep
    assert {g.group_id for g in plan.delete} == {"db1-0.5", "db1-2", "db1-25", f"db1-{24 * 15}"}


def test_prune_never_deletes_newest_complete_and_ignores_incomplete():
    groups = [
        group("db1", 0, "failed"),
        group("db1", 3),
        group("db1", 5),
        group("db1", 0.1, "taking"),
        group("db1", 10, "failed"),
        group("db2", 50),
    ]
    plan = by_host(snapshot_policy.Retention(last=1))(groups)
    assert "db1-3" in plan.keep and "db2-50" in plan.keep
    deleted = [g.group_id for g in plan.delete]
    assert deleted == ["db1-10", "db1-5"]  # failed old group and surplus complete one; fresh failure and taking kept


def test_group_ids_are_unique_and_name_the_host():
    first, second = snapshot.new_group_id("db1"), snapshot.new_group_id("db1")
    assert first.startswith("db1-") and first != second


def test_mount_script_quotes_and_assembles_raid():
    script = restore_scripts.mount_script(["/dev/sdf", "/dev/sdg"], "/mnt/x y/$(id)", "xfs", "g1/var/lib")
    assert "mdadm --assemble --run /dev/md/" in script
    assert "'/mnt/x y/$(id)'" in script and "-o nouuid" in script


def test_mount_script_stops_the_array_it_assembled_when_the_mount_fails():
    script = restore_scripts.mount_script(["/dev/sdf", "/dev/sdg"], "/mnt/r/g1/data", "xfs", "g1/data")
    assemble, mount = script.splitlines()[-2:]
    assert assemble == "mdadm --assemble --run /dev/md/g1-data /dev/sdf /dev/sdg"
    assert mount == (
        "mount -t xfs -o nouuid /dev/md/g1-data /mnt/r/g1/data || "
        "{ status=$?; mdadm --stop /dev/md/g1-data >/dev/null; exit $status; }"
    )
    single = restore_scripts.mount_script(["/dev/sdf"], "/mnt/r/g1/data", "ext4", "g1/data")
    assert "mdadm" not in single and single.endswith("mount -t ext4 -o defaults /dev/sdf /mnt/r/g1/data")


def test_create_plan_steps_say_one_call_or_parallel():
    volume = snapshot_volumes.VolumeTarget("/data", "/dev/loop3", "xfs", 0, 1, None, "vol-1")
    plan = snapshot.CreatePlan(
        "g", "db1", "i-1", "postgres", ["/data", "/wal"], [volume, volume], True, 10, "psql -c CHECKPOINT"
    )
    steps = plan.steps()
    assert "pre-freeze hook" in steps[0] and "CreateSnapshots" in steps[2] and "reverse order" in steps[3]
    assert "/wal, /data" in steps[3]
    plan.one_call = False
    assert "parallel CreateSnapshot" in plan.steps()[2]


def test_only_a_requested_thaw_completes_a_group():
    assert snapshot.early_thaw({"event": "thawed", "reason": "request", "window_ms": 30}, 10) is None
    deadline = snapshot.early_thaw({"event": "thawed", "reason": "deadline", "window_ms": 10_000}, 10)
    assert "10 s freeze deadline passed" in str(deadline)
    assert "ended early (eof)" in str(snapshot.early_thaw({"event": "thawed", "reason": "eof"}, 10))
    assert snapshot.early_thaw({"event": "thawed"}, 10) is not None


def test_a_freeze_that_ends_past_its_deadline_takes_no_snapshot():
    assert snapshot.late_freeze({"event": "frozen", "freeze_ms": 5, "deadline_ms": 9995}, 10) is None
    for left in (0, -20):
        late = snapshot.late_freeze({"event": "frozen", "freeze_ms": 10_020, "deadline_ms": left}, 10)
        assert "longer than the 10 s deadline" in str(late)


def test_prune_deletes_groups_a_killed_create_left_taking_after_the_grace():
    groups = [group("db1", 3), group("db1", 0.1, "taking"), group("db1", 5, "taking"), group("db1", 2, "failed")]
    plan = by_host(snapshot_policy.Retention(last=1))(groups)
    assert [g.group_id for g in plan.delete] == ["db1-5", "db1-2"]  # oldest first; the fresh one may still finish
    assert snapshot_groups.stale(groups[2], NOW, timedelta(hours=1))
    assert not snapshot_groups.stale(groups[1], NOW, timedelta(hours=1))
    assert not snapshot_groups.stale(groups[0], NOW, timedelta(minutes=1))  # complete groups are never stale


@dataclass
class FakeModelPostgres:
    data_directory: str = "/srv/{host}/data/pgdata"
    bin_dir: str = "/usr/lib/postgresql/15/bin/"
    os_user: str = "postgres"


def test_restored_postgres_paths_and_wal_link_follow_the_restored_mounts():
    from types import SimpleNamespace

    fleet = SimpleNamespace(
        hosts_by_name={"db2": SimpleNamespace(name="db2")},
        path_for=lambda template, host: template.replace("{host}", host.name),
        model=SimpleNamespace(postgres=FakeModelPostgres(), snapshot=SimpleNamespace(restore_root="/mnt/r/")),
    )
    restored = {"/srv/db2/data": "/mnt/r/g1/srv/db2/data", "/srv/db2/wal": "/mnt/r/g1/srv/db2/wal"}
    start = restore_scripts.postgres_start(fleet, "g1", "db2", restored, 5499)
    assert start.data_directory == "/mnt/r/g1/srv/db2/data/pgdata"
    assert start.wal_links == {"/srv/db2/wal": "/mnt/r/g1/srv/db2/wal"}
    assert start.run_directory == "/mnt/r/g1.postgres" and start.bin_dir == "/usr/lib/postgresql/15/bin"
    script = restore_scripts.prepare_script(start)
    assert '/srv/db2/wal/*) ln -sfn /mnt/r/g1/srv/db2/wal"/${wal#/srv/db2/wal/}" "$data/pg_wal"' in script
    # pg_ctl hands -o to a shell: what the server gets is that string split as a shell would.
    options = shlex.split(restore_scripts.server_options(start))
    assert {"archive_mode=off", "listen_addresses=", "port=5499", "unix_socket_directories=/mnt/r/g1.postgres"} <= set(
        options
    )
    assert shlex.quote(restore_scripts.server_options(start)) in restore_scripts.start_script(start)
    with pytest.raises(RefusedError, match="none of the group's mounts"):
        restore_scripts.postgres_start(fleet, "g1", "db2", {"/srv/db2/wal": "/x"}, 5499)


def test_cleanup_stops_only_a_server_the_restore_started_and_never_climbs_above_the_root():
    script = restore_scripts.teardown_script(
        "/mnt/r/g1/srv/db2/data/pgdata",
        "/mnt/r/g1.postgres",
        ["/dev/sdf"],
        ["/mnt/r/g1/srv/db2/data"],
        "/mnt/r/",
        FakeModelPostgres(),
    )
    # A postmaster.pid copied from the source holds the PID of a process on the source host.
    assert '"$(sed -n 5p /mnt/r/g1/srv/db2/data/pgdata/postmaster.pid)" = /mnt/r/g1.postgres ]' in script
    assert script.index("pg_ctl") < script.index("umount")
    assert "root=/mnt/r\n" in script and '"${d#"$root"/}" != "$d"' in script
    assert "rm -rf /mnt/r/g1.postgres" in script


def test_teardown_finds_what_to_unmount_by_device_never_by_the_tagged_paths():
    tagged_path = "/mnt/r/g1/it's"
    script = restore_scripts.teardown_script(
        None, "/mnt/r/g1.postgres", ["/dev/sdf", "/dev/x y;$(id)"], [tagged_path], "/mnt/r", FakeModelPostgres()
    )
    assert "for d in /dev/sdf '/dev/x y;$(id)'; do" in script
    assert "pg_ctl" not in script  # no data directory: not a Postgres group
    # A tagged path is only removed if empty: never unmounted, whatever is mounted there.
    [tagged] = [line for line in script.splitlines() if line.startswith("d=")]
    assert tagged.startswith(f"d={shlex.quote(tagged_path)}; while ") and "umount" not in tagged
    # Unmounted by the kernel's device numbers, the topmost mount first, then arrays, then a check.
    assert script.index("/proc/self/mountinfo") < script.index('umount "$m"') < script.index("mdadm --stop")
    assert script.index("mdadm --stop") < script.index("is still held by") < script.index("rm -rf")
    assert shlex.quote(restore_scripts._MOUNTS_OF) in script


def fake_volume(volume_id, tags, attachments=()):
    return {
        "VolumeId": volume_id,
        "Tags": [{"Key": key, "Value": value} for key, value in tags.items()],
        "Attachments": [{"InstanceId": instance, "Device": device} for instance, device in attachments],
    }


def test_cleanup_devices_are_where_the_volumes_are_attached_to_the_host():
    from igops import restore

    volumes = [
        fake_volume("vol-1", {}, [("i-1", "/dev/sdf")]),
        fake_volume("vol-2", {}, [("i-2", "/dev/sdg")]),  # elsewhere: not on this host
        fake_volume("vol-3", {}),  # not attached (yet, or any more)
        fake_volume("vol-4", {}, [("i-1", "/dev/sdh"), ("i-1", "/dev/sdf")]),
    ]
    assert restore.attached_devices(volumes, "i-1") == ["/dev/sdf", "/dev/sdh"]
    assert restore.attached_devices(volumes, None) == []


def test_cleanup_plan_unmounts_by_device_a_volume_mounted_but_never_tagged():
    """A restore cut off between its mount and its tag: the volume's device is in the plan, and
    the plan's steps say what the teardown does."""
    from types import SimpleNamespace

    from igops import restore

    host = SimpleNamespace(name="db4", instance_id="i-4")
    fleet = SimpleNamespace(
        host=lambda name: host,
        hosts_by_name={"db4": host, "db2": SimpleNamespace(name="db2")},
        path_for=lambda template, host: template.replace("{host}", host.name),
        model=SimpleNamespace(postgres=FakeModelPostgres(), snapshot=SimpleNamespace(restore_root="/mnt/r")),
    )
    common = {"igops:group": "g1", "igops:host": "db2", "igops:restored-to": "db4"}
    volumes = [
        fake_volume(
            "vol-d",
            {**common, "igops:mount": "/srv/db2/data", "igops:restored-at": "/mnt/r/g1/srv/db2/data"},
            [("i-4", "/dev/loop12")],
        ),
        fake_volume("vol-w", {**common, "igops:mount": "/srv/db2/wal"}, [("i-4", "/dev/loop13")]),
    ]
    ebs = SimpleNamespace(volumes=lambda filters: volumes if filters == {"igops:group": "g1"} else [])
    plan = restore.plan_cleanup(fleet, ebs, "g1", "db4")
    assert plan.devices == ["/dev/loop12", "/dev/loop13"] and plan.mounted == ["/mnt/r/g1/srv/db2/data"]
    assert plan.data_directory == "/mnt/r/g1/srv/db2/data/pgdata"
    steps = plan.steps()
    assert "stop the restored Postgres on /mnt/r/g1/srv/db2/data/pgdata" in steps[0]
    assert "unmount every filesystem on /dev/loop12, /dev/loop13 or on an md array over them" in steps[1]
    assert "still holds one of those devices" in steps[2]
    assert steps[3:5] == ["detach and delete volume vol-d", "detach and delete volume vol-w"]
    assert "/mnt/r/g1/srv/db2/data (where the restore mounted)" in steps[5] and "below /mnt/r" in steps[5]
