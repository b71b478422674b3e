"""A snapshot group's WAL mark: the tags it is kept in, and the steps it adds to a create."""

from datetime import UTC, datetime

from igops import snapshot, snapshot_wal

ENDED = datetime(2026, 12, 4, 6, 10, 1, 250000, tzinfo=UTC)

LABEL = (
    "START WAL LOCATION: 0/9000028 (file 000000030000000000000009)\n"
    "CHECKPOINT LOCATION: 0/9000060\n"
    "BACKUP METHOD: streamed\n"
    "BACKUP FROM: standby\n"
    "START TIME: 2026-12-04 06:10:00 UTC\n"
    "LABEL: db2-20261204-061000-ab12\n"
    "START TIMELINE: 3\n"
)


def test_a_mark_survives_its_tags_with_the_label_in_pieces_no_tag_can_overflow():
    mark = snapshot_wal.WalMark("main", "0/9000028", "0/9001F40", 3, LABEL, ENDED)
    tags = mark.tags()
    assert all(len(value) <= 256 for value in tags.values())
    assert f"{snapshot_wal.TAG_LABEL}1" in tags  # the label needs more than one tag
    assert snapshot_wal.from_tags({**tags, "igops:group": "g"}) == mark
    assert mark.describe()["end"] == "0/9001F40" and mark.describe()["ended_at"] == ENDED


def test_a_group_without_a_whole_mark_has_none():
    assert snapshot_wal.from_tags({"igops:group": "g"}) is None
    tags = snapshot_wal.WalMark("main", "0/1", "0/2", 1, LABEL, ENDED).tags()
    del tags[snapshot_wal.TAG_WAL_END]
    assert snapshot_wal.from_tags(tags) is None


def test_the_timeline_is_read_from_the_label():
    assert snapshot_wal.label_timeline(LABEL) == 3


def test_a_members_group_plans_the_backup_around_the_freeze():
    volume = snapshot.VolumeTarget("/data", "/dev/loop3", "xfs", 0, 1, None, "vol-1")
    plan = snapshot.CreatePlan("g", "db2", "i-1", "postgres", ["/data"], [volume], True, 10, None, wal_cluster="main")
    steps = plan.steps()
    assert steps[0].startswith("on db2: pg_backup_start") and "main's archived WAL" in steps[0]
    assert steps[1].startswith("on db2: start the thaw watchdog")
    assert steps[3].startswith("thaw") and steps[4].startswith("on db2: pg_backup_stop")
    assert "WAL range and backup_label" in steps[5]
    plan.wal_cluster = None
    assert not any("pg_backup" in step for step in plan.steps())
