"""The WAL a prune may expire: before every remaining group's start, in the current archive id."""

from datetime import UTC, datetime, timedelta

from igops import snapshot_groups, snapshot_wal
from igops.pg import archive_repository
from igops.snapshot_policy import PruneInputs, PrunePlan

ENDED = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)
PREFIX = "pgbackrest/archive/main/"
NO_SETS = PruneInputs(lambda group: None, {}, timedelta())  # a plan shown, never made again


def label(segment: str) -> str:
    return (
        f"START WAL LOCATION: 0/9000028 (file {segment})\n"
        "CHECKPOINT LOCATION: 0/9000060\nBACKUP METHOD: streamed\nBACKUP FROM: standby\n"
        "START TIME: 2026-12-04 09:00:00 UTC\nLABEL: g\nSTART TIMELINE: 2\n"
    )


def group(group_id: str, segment: str | None, cluster="main", state="complete"):
    mark = snapshot_wal.WalMark(cluster, "0/9000028", "0/9001F40", 2, label(segment) if segment else "", ENDED)
    return snapshot_groups.SnapshotGroup(group_id, "db2", ["/data"], 1, 1, state, ENDED, 1, 10.0, wal=mark)


def test_the_start_segment_is_read_from_the_backup_label():
    assert archive_repository.start_segment(label("000000020000000000000009")) == "000000020000000000000009"
    assert archive_repository.start_segment("LABEL: nothing\n") is None


def test_the_oldest_start_among_complete_groups_of_the_cluster_is_needed():
    groups = [
        group("new", "00000003000000000000000C"),
        group("old", "00000002000000000000000A"),
        group("taking", "000000020000000000000001", state="taking"),
        group("other", "000000010000000000000001", cluster="other"),
    ]
    needed = archive_repository.oldest_needed("main", groups)
    assert needed == archive_repository.Needed("00000002000000000000000A", "old")


def test_a_group_whose_label_names_no_start_keeps_everything():
    assert archive_repository.oldest_needed("main", [group("a", "00000002000000000000000A"), group("b", None)]) is None


def test_no_group_with_a_position_keeps_everything():
    plain = snapshot_groups.SnapshotGroup("p", "db2", ["/data"], 1, 1, "complete", ENDED, 1, 10.0)
    assert archive_repository.oldest_needed("main", [plain]) is None


def test_files_before_the_start_on_every_timeline_expire_and_nothing_else():
    objects = [
        (PREFIX + "archive.info", 1),
        (PREFIX + "15-1/0000000100000000/000000010000000000000001-aa.gz", 10),  # an older archive id
        (PREFIX + "15-2/00000002.history", 1),
        (PREFIX + "15-2/0000000100000000/000000010000000000000008-ab.gz", 10),
        (PREFIX + "15-2/0000000200000000/000000020000000000000009-ac.gz", 10),
        (PREFIX + "15-2/0000000200000000/000000020000000000000009.00000028.backup", 1),
        (PREFIX + "15-2/0000000200000000/00000002000000000000000A-ad.gz", 10),
        (PREFIX + "15-2/0000000200000000/00000002000000000000000A.partial-ae.gz", 10),
        (PREFIX + "15-2/0000000300000000/00000003000000000000000B-af.gz", 10),
        (PREFIX + "15-2/0000000300000001/000000030000000100000000-b0.gz", 10),
    ]
    expired = archive_repository.expirable(objects, PREFIX, "00000002000000000000000A")
    assert [key.rsplit("/", 1)[1] for key, _ in expired] == [
        "000000010000000000000008-ab.gz",
        "000000020000000000000009-ac.gz",
        "000000020000000000000009.00000028.backup",
    ]


def test_an_archive_with_no_archive_id_expires_nothing():
    assert archive_repository.expirable([(PREFIX + "archive.info", 1)], PREFIX, "00000002000000000000000A") == []


def test_the_expiry_step_says_what_and_why():
    needed = archive_repository.Needed("00000002000000000000000A", "db2-x")
    step = archive_repository.WalExpiry("main", needed, ["a", "b"], 32 << 20).step()
    assert step.startswith("expire 2 WAL files of main (32")
    assert "before segment 00000002000000000000000A, where group db2-x, the oldest it keeps, starts" in step


def test_a_prune_plan_lists_its_wal_expiry_after_the_groups():
    doomed = group("old", "000000020000000000000001")
    needed = archive_repository.Needed("00000002000000000000000A", "new")
    wal = [archive_repository.WalExpiry("main", needed, ["k"], 1)]
    plan = PrunePlan({"new": ["last"]}, [doomed], wal, made_with=NO_SETS)
    steps = plan.steps()
    assert steps[0].startswith("delete group old") and steps[1].startswith("expire 1 WAL file of main")
    nothing = PrunePlan({}, [], made_with=NO_SETS)
    assert not plan.empty() and nothing.empty()
    assert nothing.steps() == ["nothing to delete"]
