"""A snapshot group's WAL mark: the tags it is kept in, and the steps it adds to a create."""

from datetime import UTC, datetime

import pytest

from igops import snapshot, snapshot_groups, snapshot_volumes, snapshot_wal

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
    volume = snapshot_volumes.VolumeTarget("/data", "/dev/loop3", "xfs", 0, 1, None, "vol-1")
    plan = snapshot.CreatePlan("g", "db2", "i-1", "postgres", ["/data"], [volume], True, 10, None, wal_cluster="main")
    steps = plan.steps()
    assert steps[0].startswith("on db2: pg_backup_start") and "main's archived WAL" in steps[0]
    assert steps[1].startswith("on db2: start the thaw watchdog")
    assert steps[3].startswith("thaw") and steps[4].startswith("on db2: pg_backup_stop")
    assert "WAL range and backup_label" in steps[5]
    plan.checkpoint_on = "db1"
    steps = plan.steps()
    assert steps[0].startswith("on db1 (the primary): CHECKPOINT, then wait until db2 has replayed it")
    assert steps[1].startswith("on db2: pg_backup_start")
    plan.wal_cluster, plan.checkpoint_on = None, None
    assert not any("pg_backup" in step or "CHECKPOINT" in step for step in plan.steps())


def marked(group_id, ended, end, state="complete", cluster="main"):
    mark = snapshot_wal.WalMark(cluster, "0/1000028", end, 1, LABEL, ended)
    return snapshot_groups.SnapshotGroup(group_id, "db2", ["/data"], 1, 1, state, ended, 1, 10.0, wal=mark)


GROUPS = [
    marked("g-06", datetime(2026, 12, 4, 6, 0, 5, tzinfo=UTC), "0/5000000"),
    marked("g-08", datetime(2026, 12, 4, 8, 0, 5, tzinfo=UTC), "0/7000000"),
    marked("g-10", datetime(2026, 12, 4, 10, 0, 5, tzinfo=UTC), "0/9000000"),
    marked("g-11-failed", datetime(2026, 12, 4, 11, 0, 5, tzinfo=UTC), "0/A000000", state="failed"),
    marked("g-other", datetime(2026, 12, 4, 9, 0, 5, tzinfo=UTC), "0/8000000", cluster="pg2"),
]


def test_a_target_takes_the_newest_group_consistent_at_or_before_it():
    from igops.restore_target import choose_group, parse_target

    def chosen(**given):
        target = parse_target(given.get("time"), given.get("lsn"), given.get("latest", False))
        return choose_group(GROUPS, "main", target).group_id

    assert chosen(time="2026-12-04 09:59:00") == "g-08"
    assert chosen(time="2026-12-04T10:00:05Z") == "g-10"  # consistent at that very moment
    assert chosen(time="2026-12-04 11:30:00+01:00") == "g-10"  # 10:30 UTC
    assert chosen(lsn="0/8FFFFFF") == "g-08"
    assert chosen(latest=True) == "g-10"  # the failed one never counts


def test_a_target_before_every_group_is_refused_with_the_range():
    from igops.errors import RefusedError
    from igops.restore_target import choose_group, parse_target

    with pytest.raises(RefusedError) as refused:
        choose_group(GROUPS, "main", parse_target("2026-12-04 06:00:00", None, False))
    assert "g-06, is consistent from 2026-12-04T06:00:05+00:00 (LSN 0/5000000)" in refused.value.message
    with pytest.raises(RefusedError, match="no complete snapshot group of a member of pg3"):
        choose_group(GROUPS, "pg3", parse_target(None, None, True))


def test_a_target_past_the_archive_is_refused_with_where_it_ends():
    from igops.errors import RefusedError
    from igops.restore_target import parse_target, refuse_past_archive

    until = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    refuse_past_archive(parse_target("2026-12-04 11:59:00", None, False), until, "00000001000000000000000B")
    refuse_past_archive(parse_target(None, None, True), None, None)  # latest is whatever is there
    with pytest.raises(RefusedError, match=r"archived up to 2026-12-04T12:00:00\+00:00 \(00000001000000000000000B\)"):
        refuse_past_archive(parse_target("2026-12-04 12:01:00", None, False), until, "00000001000000000000000B")


def test_one_target_exactly_in_a_form_postgres_takes():
    from igops.errors import UsageError
    from igops.restore_target import parse_target

    for given in ((None, None, False), ("2026-12-04 10:00", "0/1", False), (None, "0/1", True)):
        with pytest.raises(UsageError, match="one target"):
            parse_target(*given)
    with pytest.raises(UsageError, match="not a date and time"):
        parse_target("yesterday", None, False)
    with pytest.raises(UsageError, match="not an LSN"):
        parse_target(None, "0/1'; DROP", False)
    settings = parse_target("2026-12-04 10:00", None, False).settings()
    assert settings["recovery_target_time"] == "2026-12-04 10:00:00+00:00"
    assert settings["recovery_target_action"] == "promote"
    assert parse_target(None, "0/00A0", False).settings()["recovery_target_lsn"] == "0/A0"
    assert "recovery_target_time" not in parse_target(None, None, True).settings()


def test_restore_to_names_a_time_and_says_so_when_given_a_host(tmp_path):
    """`--to` is the point in time; the host to restore onto is `--onto`. An old command line
    with `--to HOST` gets a one-line usage error naming the fix, before anything is read."""
    import json

    from tests.conftest import run_igops
    from tests.unit.inventories import unit_inventory

    config = unit_inventory(tmp_path, [("db2", "127.0.20.250", "app")])
    result = run_igops("-c", str(config), "snapshot", "restore", "g1", "--onto", "db2", "--to", "db2", "--json")
    assert result.returncode == 2, result.stderr
    error = json.loads(result.stdout)["error"]
    assert "--to takes the point in time" in error["message"] and "--onto db2" in error["hint"]
    result = run_igops("-c", str(config), "snapshot", "restore", "db2", "--onto", "db2", "--to", "then", "--json")
    assert result.returncode == 2 and "not a date and time" in json.loads(result.stdout)["error"]["message"]


def test_the_recovery_files_hold_the_label_byte_for_byte_and_the_signal(tmp_path):
    import getpass
    import subprocess

    from igops.restore_target import Recovery, parse_target, recovery_files_script

    mark = snapshot_wal.WalMark("main", "0/9000028", "0/9001F40", 3, LABEL + "LABEL: it's $(id)\n", ENDED)
    recovery = Recovery("main", "main", parse_target(None, None, True), mark, "/run/x/pgbackrest.conf")
    script = recovery_files_script(recovery, str(tmp_path), getpass.getuser())
    subprocess.run(["sh", "-c", script], check=True)
    assert (tmp_path / "backup_label").read_text() == mark.label
    assert (tmp_path / "recovery.signal").read_text() == ""
    assert recovery.restore_command() == (
        'pgbackrest --config=/run/x/pgbackrest.conf --stanza=main archive-get %f "%p"'
    )
    assert recovery.settings()["restore_command"] == recovery.restore_command()


def test_what_a_recovery_reached_is_read_from_its_log():
    from igops.restore_target import reached_from_log, replayed_bytes

    log = (
        "2026-12-04 06:20:03 UTC LOG:  starting point-in-time recovery to 2026-12-04 06:20:01.5+00\n"
        '2026-12-04 06:20:03 UTC LOG:  restored log file "000000010000000000000009" from archive\n'
        "2026-12-04 06:20:04 UTC LOG:  recovery stopping before commit of transaction 812, time 2026-12-04 "
        "06:20:03.1+00\n"
        "2026-12-04 06:20:04 UTC LOG:  redo done at 0/A0001F8 system usage: CPU: user: 0.00 s\n"
        "2026-12-04 06:20:04 UTC LOG:  last completed transaction was at log time 2026-12-04 06:20:00.2+00\n"
    )
    reached = reached_from_log(log)
    assert reached.redo_done == "0/A0001F8"
    assert reached.last_transaction == "2026-12-04 06:20:00.2+00"
    assert reached.stopped.startswith("before commit of transaction 812")
    mark = snapshot_wal.WalMark("main", "0/9000028", "0/9001F40", 1, LABEL, ENDED)
    assert replayed_bytes(mark, reached) == 0xA0001F8 - 0x9000028
    assert replayed_bytes(mark, reached_from_log("")) is None


def test_each_volume_step_says_whether_fast_snapshot_restore_initialises_it():
    from igops.restore import RestorePlan, RestoreVolume

    members = [RestoreVolume("snap-a", "/data", 0, "xfs"), RestoreVolume("snap-b", "/data", 1, "xfs")]
    plan = RestorePlan("g", "db2", "scratch", "i-1", "/restore", {"/data": members}, {"/data": "0"}, None)
    assert "fast snapshot restore unknown: the EC2 endpoint does not say" in plan.steps()[0]
    plan.fast_restore = {"snap-a": True, "snap-b": False}
    steps = plan.steps()
    assert "(/data member 0; fast snapshot restore: initialised at once)" in steps[0]
    assert "(/data member 1; no fast snapshot restore: each block is fetched on its first read)" in steps[1]


@pytest.mark.parametrize(
    ("log", "said"),
    [
        (
            "LOG:  starting point-in-time recovery\nFATAL:  recovery ended before configured recovery target was "
            "reached\nLOG:  startup process (PID 9) exited with exit code 1\nLOG:  database system is shut down\n",
            "the archive ends before the target",
        ),
        (
            "LOG:  starting\nFATAL:  could not locate required checkpoint record\nLOG:  startup process exited\n"
            "LOG:  terminating any other active server processes\nLOG:  shut down\nLOG:  down\n",
            "FATAL:  could not locate required checkpoint record",
        ),
    ],
)
def test_a_copy_that_stops_while_recovering_says_why(tmp_path, log, said):
    import subprocess

    from igops.restore_target import promoted_script

    path = tmp_path / "postgres.log"
    path.write_text(log)
    done = subprocess.run(
        ["bash", "-c", promoted_script("false", "false", str(path), 60)], capture_output=True, text=True
    )
    assert done.returncode == 1 and said in done.stderr, done.stderr
