"""Point-in-time recovery under the app's load, judged by the load generator's ledger
(docs/pitr.md):
1. a restore of main to a time T taken under load holds every write acknowledged before T and
   none sent after it;
2. cluster pg2 loses both members (their postmasters killed: the machines died) after a
   switchover gave it a new timeline; a restore `--latest` from the group taken before the
   switchover and the WAL archive loses at most the writes of the last archive_timeout window
   (shortened to 10 s for the test, which writes for longer) and the push of its segment.
   The restore reads nothing of the dead members' volumes: they are left for the lab to go on.
"""

import datetime as dt
import json
import shlex
import subprocess
import time

import pytest

from app.ids import shard_of
from app.loadgen.ledger import read_ledger
from tests.labtools import igops, postgres, wait_for
from tests.reliability.test_failover import Load, app_config, kill_postgres, lab_up, pg_state

pytestmark = pytest.mark.lab

SCRATCH = "db2"  # main's standby: no primary runs there, and a copy listens on a socket of its own
SCRATCH_PORT = "5496"
# The rows each write of the ledger leaves, by the shard of its first id.
KEYS = {
    "signup": ("users", ("id",), ("user_id",)),
    "post": ("photos", ("id",), ("photo_id",)),
    "like": ("likes", ("photo_id", "user_id"), ("photo_id", "user_id")),
    "follow": ("following", ("user_id", "followee_id"), ("user_id", "followee_id")),
}
# Writes each side of a moment the restore is judged at: enough that "all of these, none of those"
# says something.
WRITES_EACH_SIDE = 100


def shards_of(cluster: str) -> set[int]:
    from app.loadgen.verify import Stores

    stores = Stores(str(app_config()))
    try:
        return {shard for shard, owner in stores.snapshot.shard_map.cluster_of_shard.items() if owner == cluster}
    finally:
        stores.close()


def ledger_keys(ledger, shards: set[int]) -> list[tuple[tuple, dict]]:
    """(op and key, record) of every acknowledged write landing in `shards`."""
    records, _ = read_ledger(ledger)
    keyed = []
    for record in records:
        _, _, fields = KEYS[record["op"]]
        key = tuple(int(record[name]) for name in fields)
        if shard_of(key[0]) in shards:
            keyed.append(((record["op"], *key), record))
    return keyed


def sides_of(ledger, shards: set[int], moment: float) -> tuple[set[tuple], set[tuple]]:
    """The keys of the writes landing in `shards` acknowledged by `moment`, and of those sent
    after it (less any also sent before it: a like or a follow can be sent twice)."""
    writes = ledger_keys(ledger, shards)
    acknowledged = {key for key, record in writes if record["acked"] <= moment}
    sent_before = {key for key, record in writes if record["sent"] <= moment}
    sent_after = {key for key, record in writes if record["sent"] > moment} - sent_before
    return acknowledged, sent_after


def copy_keys(psql: str, shards: set[int], since: float) -> set[tuple]:
    """The keys of the rows the restored copy holds that were created since `since`."""
    after = dt.datetime.fromtimestamp(since - 60, dt.UTC).isoformat()
    selects = [
        f"SELECT '{op}', {', '.join(columns)}{', 0' * (2 - len(columns))} FROM insta{shard}.{table} "
        f"WHERE created_at >= '{after}'"
        for shard in sorted(shards)
        for op, (table, columns, _) in KEYS.items()
    ]
    argv = [*shlex.split(psql.replace(" -d postgres", " -d instagram")), "-XAtq", "-v", "ON_ERROR_STOP=1", "-F", " "]
    done = subprocess.run(
        argv, input=" UNION ALL ".join(selects) + ";", capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    keys = set()
    for line in done.stdout.split("\n"):
        if line.strip():
            op, *ids = line.split()
            width = len(KEYS[op][1])
            keys.add((op, *(int(value) for value in ids[:width])))
    return keys


def copy_timeline(psql: str) -> int:
    argv = [*shlex.split(psql), "-XAtqc", "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return int(done.stdout.strip(), 16)


def switch_and_archive(lab, node: str, cluster: str) -> None:
    """End the primary's segment and wait until the archive holds it."""
    connection = postgres(lab, node)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_logical_emit_message(false, 'igops-test', 'pitr')")
            cursor.execute("SELECT pg_walfile_name(pg_current_wal_lsn()), pg_switch_wal()")
            segment = cursor.fetchone()[0]
    finally:
        connection.close()

    def archived():
        _, envelope = igops(lab, "pg", "archive", "status", cluster)
        last = envelope["data"]["status"]["archiver"]["last_archived_wal"]
        return last is not None and last[8:] >= segment[8:]

    assert wait_for(archived, timeout=lab.model.archive.archive_timeout * 2, interval=1), f"{segment} not archived"


def restore(lab, cluster: str, *target: str) -> dict:
    restored, envelope = igops(
        lab, "snapshot", "restore", cluster, *target, "--onto", SCRATCH, "--port", SCRATCH_PORT, "--yes", timeout=900
    )
    assert restored.returncode == 0, restored.stderr[-3000:]
    return envelope["data"]


def cleanup(lab, group_id: str) -> None:
    igops(lab, "snapshot", "restore", group_id, "--onto", SCRATCH, "--cleanup", "--yes")
    igops(lab, "snapshot", "delete", group_id, "--accept-risk", "--yes")


def test_a_restore_to_a_time_under_load_holds_every_write_acknowledged_before_it_and_none_sent_after(lab, tmp_path):
    shards = shards_of("main")
    assert shards, "main holds logical shards"
    group_id = None
    try:
        with Load(lab, tmp_path) as load:
            began = time.time()
            created, envelope = igops(lab, "snapshot", "create", SCRATCH, "--no-hook", "--yes", timeout=300)
            assert created.returncode == 0, created.stderr
            group_id = envelope["data"]["group_id"]
            grouped = time.time()
            # Writes for the restore to replay from the group up to T, then writes after T for it
            # to leave out.
            assert wait_for(
                lambda: len(sides_of(load.ledger, shards, grouped)[1]) > WRITES_EACH_SIDE, 60, interval=0.2
            ), "the load did not write to main after the group"
            target = time.time()
            assert wait_for(
                lambda: len(sides_of(load.ledger, shards, target)[1]) > WRITES_EACH_SIDE, 60, interval=0.2
            ), "the load did not write to main after T"
        switch_and_archive(lab, "db1", "main")
        moment = dt.datetime.fromtimestamp(target, dt.UTC).isoformat(timespec="microseconds")
        data = restore(lab, "main", "--to", moment)
        assert data["group_id"] == group_id, "the newest group before T"
        held = copy_keys(data["postgres"]["psql"], shards, began)
        before, after = sides_of(load.ledger, shards, target)
        print(
            f"\n{len(before)} writes acknowledged before T, {len(after)} sent after it; "
            f"recovered to {data['reached']['last_transaction']}, {data['reached']['replayed_bytes']} of WAL replayed"
        )
        assert len(before) > WRITES_EACH_SIDE and len(after) > WRITES_EACH_SIDE, "the load wrote on both sides of T"
        assert sorted(before - held)[:10] == [], "a write acknowledged before T is missing"
        assert sorted(after & held)[:10] == [], "a write sent after T is present"
    finally:
        if group_id:
            cleanup(lab, group_id)


# The loss test's archive_timeout, well under the time it writes for, so that its bound on what is
# lost says something; and how long pgBackRest may take to push a switched segment on top of it.
SHORT_ARCHIVE_TIMEOUT = 10
PUSH_ALLOWANCE = 5


def archive_setup(lab, cluster: str, config=None) -> None:
    """`igops pg archive setup CLUSTER` with the lab's inventory or `config` (archive_timeout is
    a reload, no restart)."""
    argv = ["-c", str(config)] if config else []
    result, _ = igops(lab, *argv, "pg", "archive", "setup", cluster, "--yes", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture
def pg2_home(lab):
    """pg2 with db3 its primary and db4 streaming, before and after, archiving with the lab's
    own settings afterwards."""
    yield lab
    state = pg_state(lab, "pg2")
    if any(node["state"] != "running" for node in state["nodes"]):
        lab_up()
    state = pg_state(lab, "pg2")
    for node in state["nodes"]:
        if state["primary"] and node["role"] == "standby" and node["streaming_from"] != state["primary"]:
            igops(lab, "pg", "rejoin", node["name"], "--yes", "--accept-risk")
    if pg_state(lab, "pg2")["primary"] != "db3":
        switched, _ = igops(lab, "pg", "switchover", "pg2", "--to", "db3", "--yes")
        assert switched.returncode == 0, switched.stderr[-3000:]
    archive_setup(lab, "pg2")


def test_losing_both_members_of_a_cluster_loses_at_most_the_last_archive_timeout_of_writes(pg2_home, tmp_path):
    lab = pg2_home
    shards = shards_of("pg2")
    assert shards, "pg2 holds logical shards"
    assert pg_state(lab, "pg2")["primary"] == "db3"
    short = tmp_path / "igops.toml"
    text = lab.source.read_text()
    assert text.count("archive_timeout = 60") == 1, "the lab's [archive] archive_timeout"
    short.write_text(text.replace("archive_timeout = 60", f"archive_timeout = {SHORT_ARCHIVE_TIMEOUT}"))
    archive_setup(lab, "pg2", short)
    window = SHORT_ARCHIVE_TIMEOUT + PUSH_ALLOWANCE
    group_id = None
    try:
        # Nothing written after the loss is judged, and writes to pg2 no longer flow: the load is
        # stopped at once, not once writes flow again.
        with Load(lab, tmp_path, tail_writes=0) as load:
            began = time.time()
            created, envelope = igops(lab, "snapshot", "create", "db4", "--no-hook", "--yes", timeout=300)
            assert created.returncode == 0, created.stderr
            group_id = envelope["data"]["group_id"]
            grouped = time.time()
            # Writes on the group's timeline for the restore to replay before it follows the next.
            assert wait_for(
                lambda: len(sides_of(load.ledger, shards, grouped)[1]) > WRITES_EACH_SIDE, 60, interval=0.2
            ), "the load did not write to pg2 after the group"
            # A new timeline between the group and the loss: the restore must follow it.
            switched, _ = igops(lab, "pg", "switchover", "pg2", "--to", "db4", "--yes")
            assert switched.returncode == 0, switched.stderr[-3000:]
            switched_at = time.time()

            def bound_can_fail() -> bool:
                """The load has written for longer than the bound asserted below, and writes on the
                new timeline were acknowledged longer than `window` ago: the restore must hold them."""
                old_enough = time.time() - window
                held_on_the_new_timeline = {
                    key
                    for key, record in ledger_keys(load.ledger, shards)
                    if record["sent"] > switched_at and record["acked"] < old_enough
                }
                return time.time() - began > 1.5 * window and len(held_on_the_new_timeline) > WRITES_EACH_SIDE

            assert wait_for(bound_can_fail, 1.5 * window + 60, interval=0.2), "too few writes on pg2's new timeline"
            lost_at = time.time()
            kill_postgres(lab, "db4")
            kill_postgres(lab, "db3")
        data = restore(lab, "pg2", "--latest")
        assert data["group_id"] == group_id
        held = copy_keys(data["postgres"]["psql"], shards, began)
        writes = ledger_keys(load.ledger, shards)
        acknowledged = {key: record for key, record in writes if record["acked"] <= lost_at}
        lost = {key: record for key, record in acknowledged.items() if key not in held}
        oldest = min((record["acked"] for record in lost.values()), default=None)
        print(
            f"\npg2 lost at {lost_at:.0f} with {len(acknowledged)} writes acknowledged since the group; "
            f"recovered to {data['reached']['last_transaction']}: {len(lost)} lost"
            + (f", the oldest acknowledged {lost_at - oldest:.1f} s before the loss" if lost else "")
            + f" (archive_timeout {SHORT_ARCHIVE_TIMEOUT} s)"
        )
        assert len(acknowledged) > 100, "the load wrote to pg2"
        assert lost_at - began > 1.5 * window, "the load wrote for longer than the bound on what is lost"
        assert oldest is None or lost_at - oldest <= window, json.dumps(sorted(lost.values(), key=str)[:5])
        assert data["reached"]["redo_done"], data["reached"]
        _, shown = igops(lab, "snapshot", "show", group_id)
        grouped_on = shown["data"]["group"]["wal"]["timeline"]
        # The switchover's timeline followed, and the copy's promotion began one more.
        assert copy_timeline(data["postgres"]["psql"]) == grouped_on + 2
    finally:
        if group_id:
            cleanup(lab, group_id)
