"""`igops pg archive` against the lab: pgBackRest archives cluster main's WAL to moto's bucket
through the TLS front; a second setup plans nothing; a switched segment reaches the repository
within archive_timeout; after a switchover the new primary archives too, its timeline history
file included. Leaves db1 the primary of main and archiving set up."""

import json
import re
import time

import pytest

from igops.errors import ExitCode
from igops.lab import aws, state
from igops.lab.state import WAL_BUCKET
from tests.conftest import run_igops
from tests.labtools import igops, postgres, wait_for

pytestmark = pytest.mark.lab

HOME_PRIMARY, OTHER_PRIMARY = "db1", "db2"


def status(lab):
    result, envelope = igops(lab, "pg", "archive", "status", "main")
    assert envelope is not None, result.stderr
    return result, envelope["data"]["status"]


def switch_wal(lab, node):
    """End the current segment; something is written first, or an empty segment is not switched."""
    connection = postgres(lab, node)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_logical_emit_message(false, 'igops-test', 'archive')")
            cursor.execute("SELECT pg_walfile_name(pg_current_wal_lsn()), pg_switch_wal()")
            return cursor.fetchone()[0]
    finally:
        connection.close()


def archived_after(lab, segment, timeout):
    """The status once the primary has archived `segment` (or a later one)."""
    found = {}

    def archived():
        _, found["status"] = status(lab)
        last = found["status"]["archiver"]["last_archived_wal"]
        return last is not None and last >= segment

    assert wait_for(archived, timeout=timeout, interval=1), f"{segment} not archived within {timeout} s: {found}"
    return found["status"]


def repository_keys(prefix):
    s3 = aws.client("s3")
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=WAL_BUCKET, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


@pytest.fixture
def at_home(lab):
    yield lab
    _, envelope = igops(lab, "pg", "status", "main")
    if envelope is None or envelope["data"]["clusters"][0]["primary"] != HOME_PRIMARY:
        igops(lab, "pg", "switchover", "main", "--to", HOME_PRIMARY, "--yes")


def test_setup_archives_and_a_second_run_plans_nothing(at_home):
    lab = at_home
    dry, envelope = igops(lab, "pg", "archive", "setup", "main", "--restart-primary", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    planned = envelope["plan"]["steps"] if envelope["plan"] else []
    if planned:  # a lab that ran this test before has it set up already
        assert any("pgbackrest check" in step for step in planned)
        result, envelope = igops(lab, "pg", "archive", "setup", "main", "--restart-primary", "--yes", timeout=600)
        assert result.returncode == 0, result.stderr
        assert envelope["data"]["changed"] is True

    again, envelope = igops(lab, "pg", "archive", "setup", "main")
    assert again.returncode == 0, again.stderr
    assert envelope["plan"] is None and envelope["data"]["changed"] is False
    assert "nothing to do" in again.stderr + again.stdout

    timeout = lab.model.archive.archive_timeout
    segment = switch_wal(lab, HOME_PRIMARY)
    state = archived_after(lab, segment, timeout=timeout)
    assert state["archiver"]["last_archived_age_s"] < timeout
    assert state["repository"]["exists"] and state["repository"]["ranges"]
    assert state["repository"]["ranges"][0]["max_wal"] >= segment
    assert state["repository_bytes"] and state["repository_bytes"] > 0
    # Archiving works now: any failure is older than the last success. (A failure in the last
    # 2 x archive_timeout, from moto restarting under an earlier lab up, still makes status exit 5.)
    archiver = state["archiver"]
    assert archiver["last_failed_age_s"] is None or archiver["last_failed_age_s"] > archiver["last_archived_age_s"]
    assert not [problem for problem in state["problems"] if "failed" not in problem], state["problems"]


def test_the_new_primary_archives_after_a_switchover(at_home):
    lab = at_home
    result, _ = igops(lab, "pg", "archive", "setup", "main", "--restart-primary", "--yes", timeout=600)
    assert result.returncode == 0, result.stderr
    started = time.time()
    result, _ = igops(lab, "pg", "switchover", "main", "--to", OTHER_PRIMARY, "--yes")
    assert result.returncode == 0, result.stderr
    try:
        segment = switch_wal(lab, OTHER_PRIMARY)
        timeline = segment[:8]
        state = archived_after(lab, segment, timeout=lab.model.archive.archive_timeout)
        assert state["primary"] == OTHER_PRIMARY
        assert state["archiver"]["last_archived_wal"].startswith(timeline)
        assert state["archiver"]["last_archived_age_s"] < time.time() - started
        history = f"{timeline}.history"
        assert wait_for(
            lambda: any(key.endswith(history) for key in repository_keys("pgbackrest/archive/main/")),
            timeout=30,
            interval=1,
        ), f"{history} is not in the repository"
    finally:
        result, _ = igops(lab, "pg", "switchover", "main", "--to", HOME_PRIMARY, "--yes")
        assert result.returncode == 0, result.stderr
    # A rewound member takes its source's postgresql.auto.conf (pg_rewind copies it), and the
    # lab's configuration files are per host: setup puts back only what differs, no restart.
    result, envelope = igops(lab, "pg", "archive", "setup", "main", "--yes", timeout=600)
    assert result.returncode == 0, result.stderr
    assert not any("restart" in step for step in (envelope["plan"] or {}).get("steps", []))
    again, envelope = igops(lab, "pg", "archive", "setup", "main")
    assert again.returncode == 0 and envelope["data"]["changed"] is False, again.stderr


def test_a_standbys_snapshot_group_records_where_in_the_wal_it_is_consistent(at_home):
    """With WAL archived, a member's group is taken inside pg_backup_start/stop: its tags hold the
    WAL range and the backup_label a point-in-time restore needs."""
    lab = at_home
    connection = postgres(lab, HOME_PRIMARY)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_current_wal_lsn()::text")
            (before,) = cursor.fetchone()
    finally:
        connection.close()
    result, envelope = igops(lab, "snapshot", "create", OTHER_PRIMARY, "--no-hook", "--yes", timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"CHECKPOINT on {HOME_PRIMARY}, replayed on {OTHER_PRIMARY}" in result.stderr, result.stderr
    group_id = envelope["data"]["group_id"]
    try:
        shown, envelope = igops(lab, "snapshot", "show", group_id)
        assert shown.returncode == 0, shown.stderr
        mark = envelope["data"]["group"]["wal"]
        assert mark["cluster"] == "main", mark
        assert "BACKUP FROM: standby" in mark["label"] and f"LABEL: {group_id}" in mark["label"]
        connection = postgres(lab, OTHER_PRIMARY)
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT %s::pg_lsn <= %s::pg_lsn, %s::pg_lsn <= pg_last_wal_replay_lsn(),"
                    " (SELECT timeline_id FROM pg_control_checkpoint())",
                    (mark["start"], mark["end"], mark["end"]),
                )
                ordered, replayed_since, timeline = cursor.fetchone()
        finally:
            connection.close()
        assert ordered and replayed_since, mark
        # The primary's checkpoint just before: replay starts at the group, not checkpoints back.
        connection = postgres(lab, HOME_PRIMARY)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT %s::pg_lsn >= %s::pg_lsn", (mark["start"], before))
                assert cursor.fetchone()[0], (mark, before)
        finally:
            connection.close()
        assert mark["timeline"] == timeline
        print(f"\nmark: {mark['start']} .. {mark['end']} on timeline {mark['timeline']}")
    finally:
        deleted, _ = igops(lab, "snapshot", "delete", group_id, "--accept-risk", "--yes")
        assert deleted.returncode == 0, deleted.stderr


def test_a_restore_to_a_point_in_time_holds_what_was_written_before_it_and_nothing_after(at_home):
    """A group of db2, rows written after it, a time T between two batches of rows, the WAL
    archived past T: the restore to T has the first batch and none of the second, and says where
    it stopped. A time after the archive ends, and one before the group, are refused."""
    import shlex
    import subprocess

    lab = at_home
    created, envelope = igops(lab, "snapshot", "create", OTHER_PRIMARY, "--no-hook", "--yes", timeout=300)
    assert created.returncode == 0, created.stderr
    group_id = envelope["data"]["group_id"]
    connection = postgres(lab, HOME_PRIMARY)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "CREATE TABLE IF NOT EXISTS pitr_probe (batch int, at timestamptz DEFAULT clock_timestamp())"
            )
            cursor.execute("TRUNCATE pitr_probe")
            cursor.execute("INSERT INTO pitr_probe (batch) SELECT 1 FROM generate_series(1, 100)")
            time.sleep(1.5)
            cursor.execute("SELECT clock_timestamp()::text")
            target = cursor.fetchone()[0]
            time.sleep(1.5)
            cursor.execute("INSERT INTO pitr_probe (batch) SELECT 2 FROM generate_series(1, 100)")
    finally:
        connection.close()
    archived_after(lab, switch_wal(lab, HOME_PRIMARY), timeout=lab.model.archive.archive_timeout)

    late, envelope = igops(lab, "snapshot", "restore", "main", "--to", "2099-01-01 00:00:00", "--onto", "db2")
    assert late.returncode == ExitCode.REFUSED and "after the archive reaches" in envelope["error"]["message"]
    early, envelope = igops(lab, "snapshot", "restore", "main", "--to", "2000-01-01 00:00:00", "--onto", "db2")
    assert (
        early.returncode == ExitCode.REFUSED and "before every retained snapshot group" in envelope["error"]["message"]
    )

    try:
        restored, envelope = igops(
            lab,
            "snapshot",
            "restore",
            "main",
            "--to",
            target,
            "--onto",
            OTHER_PRIMARY,
            "--port",
            "5498",
            "--warm-from",
            HOME_PRIMARY,
            "--yes",
            timeout=900,
        )
        assert restored.returncode == 0, restored.stderr[-3000:]
        data = envelope["data"]
        assert data["group_id"] == group_id, "the newest group before T"
        # moto does not answer DescribeFastSnapshotRestores: the restore says it does not know.
        assert data["fast_restore"] is None
        warmed = data["warmed"]
        assert "error" not in warmed and warmed["from"] == HOME_PRIMARY and warmed["warmed_pages"] > 0, warmed
        print(f"\nrecovered: {data['reached']}")
        assert data["reached"]["redo_done"] and (data["reached"]["stopped"] or "").startswith("before commit")
        counted = subprocess.run(
            [*shlex.split(data["postgres"]["psql"]), "-XAtc", "SELECT batch, count(*) FROM pitr_probe GROUP BY 1"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert counted.stdout.split() == ["1|100"], counted.stdout
    finally:
        removed, _ = igops(lab, "snapshot", "restore", group_id, "--onto", OTHER_PRIMARY, "--cleanup", "--yes")
        deleted, _ = igops(lab, "snapshot", "delete", group_id, "--accept-risk", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert deleted.returncode == 0, deleted.stderr


def without_groups_of(lab, cluster: str) -> None:
    """Delete the complete groups of `cluster` other tests left (tests run by hand after the
    snapshot tests, say), pins released: on any member, the oldest would decide from where a
    prune keeps the cluster's WAL, not the groups the test makes."""
    from igops import snapshot_groups
    from igops.ebs import Ebs

    for group in snapshot_groups.groups(Ebs(lab)):
        if group.complete and group.wal is not None and group.wal.cluster == cluster:
            if group.kept:
                igops(lab, "snapshot", "keep", group.group_id, "--release", "--yes")
            deleted, _ = igops(lab, "snapshot", "delete", group.group_id, "--accept-risk", "--yes")
            assert deleted.returncode == 0, deleted.stderr[-3000:]


def test_a_prune_expires_the_wal_only_deleted_groups_needed_and_a_drill_still_passes(at_home):
    """Three groups of db2 with WAL between them: a prune keeping the newest (and, by the lab's
    minimum redundancy of 2, the one before) deletes the oldest and the archived segments before
    the second one's start, and nothing from it on (history files stay). A drill then restores
    to a random moment of what is left, checks the copy and takes it away, and `igops check`
    reads its age."""
    lab = at_home
    without_groups_of(lab, "main")
    groups = []
    try:
        for _ in range(3):
            created, envelope = igops(lab, "snapshot", "create", OTHER_PRIMARY, "--no-hook", "--yes", timeout=300)
            assert created.returncode == 0, created.stderr
            groups.append(envelope["data"]["group_id"])
            # A checkpoint replayed moves the standby's next restartpoint: the next group starts later.
            connection = postgres(lab, HOME_PRIMARY)
            try:
                with connection.cursor() as cursor:
                    cursor.execute("CHECKPOINT")
            finally:
                connection.close()
            archived_after(lab, switch_wal(lab, HOME_PRIMARY), timeout=lab.model.archive.archive_timeout)
        starts = []
        for group_id in groups:
            _, envelope = igops(lab, "snapshot", "show", group_id)
            label = envelope["data"]["group"]["wal"]["label"]
            starts.append(re.search(r"\(file ([0-9A-F]{24})\)", label).group(1))
        keep_from = starts[1]
        assert starts[0][8:] < keep_from[8:], starts

        histories = {key for key in repository_keys("pgbackrest/archive/main/") if key.endswith(".history")}
        pruned, envelope = igops(lab, "snapshot", "prune", "--keep-last", "1", "--host", OTHER_PRIMARY, "--yes")
        assert pruned.returncode == 0, pruned.stderr
        assert groups[0] in envelope["data"]["deleted"] and not set(groups[1:]) & set(envelope["data"]["deleted"])
        # Every archived cluster's WAL older than its groups need goes (pg2's too, unless an earlier
        # prune took it); main's is what these groups decide.
        [expiry] = [expiry for expiry in envelope["data"]["wal"] if expiry["cluster"] == "main"]
        assert expiry["keep_from"] == keep_from and expiry["files"] > 0, expiry
        keys = repository_keys("pgbackrest/archive/main/")
        names = [key.rsplit("/", 1)[1] for key in keys]
        segments = [name for name in names if re.match(r"^[0-9A-F]{24}[.-]", name)]
        assert segments and all(name[8:24] >= keep_from[8:] for name in segments), segments[:5]
        assert histories <= set(keys), "timeline history files stay"

        drilled, envelope = igops(lab, "snapshot", "drill", "main", "--onto", OTHER_PRIMARY, "--yes", timeout=900)
        assert drilled.returncode == 0, drilled.stderr[-3000:]
        result = envelope["data"]
        assert result["passed"] and result["group_id"] in groups[1:], result
        assert result["amcheck"] == "no corruption found" and result["shards"], result
        print(f"\ndrill: RTO {result['rto_s']} s to {result['target']}, {len(result['shards'])} shards compared")
        _, envelope = igops(lab, "snapshot", "restore", groups[1], "--onto", OTHER_PRIMARY, "--cleanup", "--dry-run")
        assert "is not restored onto" in envelope["error"]["message"], "the drill took its copy away"
        drill = check_archive(state.paths().inventory, "main", only="drill")
        assert drill["status"] == "OK" and "last drill that passed" in drill["summary"], drill
    finally:
        for group_id in groups:
            igops(lab, "snapshot", "delete", group_id, "--accept-risk", "--yes")


def check_archive(config, cluster="main", only="archive"):
    result = run_igops("-c", str(config), "check", "--only", only, "--json", timeout=120)
    [found] = [r for r in json.loads(result.stdout)["data"]["results"] if r["target"] == cluster and r["check"] == only]
    return found


def test_a_broken_repository_warns_then_is_critical_and_loses_no_wal_once_back(at_home, tmp_path):
    """The repository's TLS front stopped: archive-push fails, `igops check` says WARNING at once
    and CRITICAL once the waiting WAL is 10 × archive_timeout old (an inventory copy with a 1 s
    archive_timeout, so the test does not wait 10 minutes); back, the spool drains and every
    segment written meanwhile is in the repository."""
    from igops.lab import proc, s3tls, state

    lab = at_home
    config = tmp_path / "igops.toml"
    text = lab.source.read_text()
    assert "archive_timeout = 60" in text
    config.write_text(text.replace("archive_timeout = 60", "archive_timeout = 1"))
    assert check_archive(config)["status"] == "OK"
    paths = state.paths()
    front = s3tls.daemon(paths)
    pid = proc.running_pid(front.pid_file, paths.root)
    assert pid, "the TLS front is not running"
    proc.terminate([pid])
    written = []
    try:
        written.append(switch_wal(lab, HOME_PRIMARY))
        found = {}

        def warning():
            found.update(check_archive(config))
            return found["status"] == "WARNING"

        assert wait_for(warning, timeout=60, interval=2), found
        written.append(switch_wal(lab, HOME_PRIMARY))

        def critical():
            found.update(check_archive(config))
            return found["status"] == "CRITICAL"

        assert wait_for(critical, timeout=120, interval=3), found
        print(f"\nwith the repository gone: {found['summary']}")
    finally:
        proc.start(front, paths.root)
    archived_after(lab, written[-1], timeout=120)
    # The backlog empties; it need not be empty at the instant the last segment written is
    # archived: the server's own archive_timeout (60 s) or repmgr's writes can switch a new
    # segment at any moment, and it waits the second archive-push takes.
    backlog = {}

    def drained():
        _, backlog["status"] = status(lab)
        return backlog["status"]["ready_files"] == 0

    assert wait_for(drained, timeout=30, interval=1), backlog
    keys = repository_keys("pgbackrest/archive/main/")
    for segment in written:
        assert any(segment in key for key in keys), f"{segment} was never archived"
    assert wait_for(lambda: check_archive(config)["status"] == "OK", timeout=60, interval=2)
