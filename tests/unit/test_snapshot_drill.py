"""The drill's pure parts: its target, the row counts it compares, and the check's verdict on
the last drill that passed."""

import random
from datetime import UTC, datetime, timedelta

import pytest

from igops import snapshot_drill
from igops.checks.archive import drill_verdict, restorable_since
from igops.errors import NagiosStatus, RefusedError

FROM = datetime(2026, 12, 4, 6, 0, tzinfo=UTC)
UNTIL = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def test_a_drill_picks_a_random_moment_of_the_range_or_the_one_given():
    rng = random.Random(7)
    picks = [snapshot_drill.drill_target(FROM, UNTIL, None, rng) for _ in range(50)]
    assert all(FROM <= target.time <= UNTIL and chosen for target, chosen in picks)
    assert len({target.time for target, _ in picks}) == 50
    target, chosen = snapshot_drill.drill_target(FROM, UNTIL, "2026-12-04 07:00:00", rng)
    assert target.time == datetime(2026, 12, 4, 7, 0, tzinfo=UTC) and not chosen
    with pytest.raises(RefusedError, match="reaches no further"):
        snapshot_drill.drill_target(UNTIL, UNTIL, None, rng)


def test_rows_are_counted_per_shard_and_a_copy_with_fewer_lost_writes():
    sql = snapshot_drill.count_sql("insta_x", datetime(2026, 12, 4, 7, 0, tzinfo=UTC))
    assert "LIKE 'insta\\_x%'" in sql and "'2026-12-04T07:00:00+00:00'::timestamptz" in sql
    assert snapshot_drill.parse_counts("insta1|40\ninsta2|7\n") == {"insta1": 40, "insta2": 7}
    shards, problems = snapshot_drill.compare_counts({"insta1": 40, "insta2": 7}, {"insta1": 38, "insta2": 9})
    assert shards["insta1"] == {"copy": 40, "source": 38}  # deletes since: not a loss
    assert problems == ["insta2: the copy has 7 rows, the source 9"]


def drill(op_id, cluster, ended, passed=True):
    return {
        "id": op_id,
        "kind": "snapshot-drill",
        "ended": ended.isoformat(),
        "facts": {"drill": {"cluster": cluster, "passed": passed, "rto_s": 42.0}},
    }


def test_the_check_ages_the_last_drill_that_passed():
    now = datetime(2026, 12, 20, tzinfo=UTC)
    records = [
        drill("a", "main", now - timedelta(days=9)),
        drill("b", "main", now - timedelta(days=1), passed=False),
        drill("c", "pg2", now - timedelta(days=20)),
        {"id": "d", "kind": "snapshot-create", "ended": now.isoformat()},
    ]
    status, summary, days = drill_verdict(records, "main", now, 7, 14)
    assert status == NagiosStatus.WARNING and "a, 9.0 days ago, RTO 42.0 s" in summary and days == 9
    assert drill_verdict(records, "pg2", now, 7, 14)[0] == NagiosStatus.CRITICAL
    status, summary, days = drill_verdict(records, "pg3", now, 7, 14)
    assert (status, days) == (NagiosStatus.OK, None) and "nothing to drill yet" in summary
    status, summary, days = drill_verdict(records, "pg3", now, 7, 14, now - timedelta(days=8))
    assert status == NagiosStatus.WARNING and days == 8
    assert "never drilled, restorable to a point in time for 8.0 days: `igops snapshot drill pg3" in summary
    assert drill_verdict(records, "pg3", now, 7, 14, now - timedelta(days=2))[0] == NagiosStatus.OK
    assert drill_verdict([drill("e", "main", now - timedelta(hours=3))], "main", now, 7, 14)[0] == NagiosStatus.OK


def test_a_cluster_is_restorable_since_its_oldest_complete_group_with_a_wal_position():
    from igops import snapshot_groups, snapshot_wal

    def group(cluster, ended, state="complete"):
        mark = snapshot_wal.WalMark(cluster, "0/1", "0/2", 1, "", ended)
        return snapshot_groups.SnapshotGroup("g", "db2", ["/data"], 1, 1, state, ended, 1, 1.0, wal=mark)

    groups = [group("main", UNTIL), group("main", FROM), group("main", FROM - timedelta(days=1), "failed")]
    groups.append(group("pg2", FROM - timedelta(days=3)))
    groups.append(
        snapshot_groups.SnapshotGroup("p", "db2", ["/data"], 1, 1, "complete", FROM - timedelta(days=9), 1, 1.0)
    )
    assert restorable_since(groups, "main") == FROM
    assert restorable_since(groups, "other") is None
