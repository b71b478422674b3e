"""Online shard moves in the lab, with the app's load generator writing into the shard being moved:
a move there and back under load, igops SIGKILLed at every step and then resumed or aborted, bad
input, a second move of a running one, and a rebalance. Every test leaves the lab's layout as it
found it (shards 0-7 on main, 8-15 on pg2) and no replication object behind."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from igops import shard_init, shard_journal, shard_map, shard_verify, shards
from igops.errors import ExitCode
from igops.lab import state
from igops.postgres_admin import connect
from tests.conftest import ROOT, run_igops
from tests.labtools import trim_wal, verify_lab_ledger, wait_for, wait_replayed

pytestmark = pytest.mark.lab

LOAD_USERS = 40


def env(fleet) -> dict:
    return {"IGOPS_CONFIG": str(fleet.source)}


def pg(fleet, cluster, database=None):
    return connect(fleet, cluster, database or fleet.model.postgres.database, autocommit=True, purpose="test")


def query(fleet, cluster, sql, params=(), database=None):
    connection = pg(fleet, cluster, database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params or None)
            return cursor.fetchall() if cursor.description else None
    finally:
        connection.close()


def directory(fleet, sql, params=()):
    return query(fleet, fleet.model.shards.directory_cluster, sql, params, fleet.model.shards.directory_database)


def placement(fleet, shard) -> str:
    return directory(fleet, "SELECT cluster FROM shard_map WHERE logical_shard = %s", (shard,))[0][0]


def map_version(fleet) -> int:
    return directory(fleet, "SELECT version FROM shard_map_version")[0][0]


def other_cluster(fleet, cluster) -> str:
    return next(name for name in fleet.model.postgres.clusters if name != cluster)


def schemas(fleet, cluster, shard) -> set:
    return {
        row[0]
        for row in query(
            fleet,
            cluster,
            "SELECT nspname FROM pg_namespace WHERE nspname = %s OR nspname LIKE %s",
            (f"insta{shard}", f"insta{shard}_moved_%"),
        )
    }


def leftovers(fleet) -> list:
    """Replication objects and fenced copies a move may leave: none may outlive it."""
    found = []
    for cluster in fleet.model.postgres.clusters:
        for kind, sql in (
            ("slot", "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'igops_move_%'"),
            ("publication", "SELECT pubname FROM pg_publication WHERE pubname LIKE 'igops_move_%'"),
            ("subscription", "SELECT subname FROM pg_subscription WHERE subname LIKE 'igops_move_%'"),
            ("old copy", "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'insta%\\_moved\\_%'"),
        ):
            found += [f"{cluster} {kind} {row[0]}" for row in query(fleet, cluster, sql)]
    return found


def journal(fleet, move_id) -> dict:
    result = run_igops("shard", "moves", "--limit", "50", "--json", env=env(fleet))
    return next(m for m in json.loads(result.stdout)["data"]["moves"] if m["id"] == move_id)


def latest_move_id(fleet) -> int:
    return directory(fleet, "SELECT max(id) FROM shard_moves")[0][0]


class PausedMove:
    """`igops shard move --pause-after POINT` (of a new move, or `--resume` of one) running until
    it says it paused there."""

    def __init__(self, fleet, shard, target, point, resume=None):
        which = ["--resume", str(resume)] if resume is not None else [str(shard), "--to", target]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "igops", "shard", "move", *which, "--yes", "--pause-after", point],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env(fleet), "NO_COLOR": "1"},
        )
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 90
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"never paused after {point}:\n" + "".join(self.stderr))
            if f"paused after {point}" in line:
                return

    def _read(self):
        for line in self.process.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)


def shard_of_ledger_users(ledger: Path) -> Counter:
    from app.loadgen.ledger import read_ledger

    return Counter(
        shards.decode_id(entry["user_id"]).shard for entry in read_ledger(ledger)[0] if entry["op"] == "signup"
    )


def busiest_shard(ledger: Path) -> int:
    assert wait_for(lambda: ledger.exists() and sum(shard_of_ledger_users(ledger).values()) >= LOAD_USERS, 90), (
        "the load generator never finished signing up its users"
    )
    return min(shard_of_ledger_users(ledger).most_common(), key=lambda item: (-item[1], item[0]))[0]


def ledger_ids(ledger: Path, shard: int) -> list[tuple[int, float, float]]:
    """(id, sent, acked) of every id the service minted on `shard`: users and photos."""
    from app.loadgen.ledger import read_ledger

    found = []
    for entry in read_ledger(ledger)[0]:
        key = {"signup": "user_id", "post": "photo_id"}.get(entry["op"])
        if key and shards.decode_id(entry[key]).shard == shard:
            found.append((entry[key], entry["sent"], entry["acked"]))
    return found


def gunicorn_pids() -> dict:
    paths = state.paths()
    return {
        host: (paths.app_root(host) / "shared" / "gunicorn.pid").read_text().strip()
        for host in ("app1", "app2", "app3")
    }


def lb_url(fleet) -> str:
    lb = fleet.with_role("lb")[0]
    return f"http://{lb.address}:{fleet.model.lb.port}"


@pytest.fixture(scope="module", autouse=True)
def home_layout(lab):
    """Whatever a test leaves, put every shard back where the lab keeps it."""
    yield
    home = shard_init.even_placement(list(lab.model.postgres.clusters), lab.model.shards.count)
    connection = shard_map.directory_connection(lab)
    try:
        active = shard_journal.Journal(connection).active()
    finally:
        connection.close()
    for record in active:
        try:
            shards.abort_move(lab, shards.plan_abort(lab, record.id))
        except Exception:  # noqa: BLE001 - a switched move cannot be aborted: finish it
            shards.resume_move(lab, record.id)
    for shard, cluster in home.items():
        if placement(lab, shard) != cluster:
            shards.start_move(lab, shards.plan_move(lab, shard, cluster))
    assert leftovers(lab) == []


def test_move_there_and_back_under_load_loses_nothing_and_the_app_follows(lab, tmp_path):
    from app.loadgen import run_load

    ledger = tmp_path / "ledger.jsonl"
    pids = gunicorn_pids()
    outcome = {}
    load = threading.Thread(
        target=lambda: outcome.update(
            report=run_load(
                url=lb_url(lab), rate=60, duration=28, ledger=ledger, users=LOAD_USERS, concurrency=12, seed=21
            )
        )
    )
    load.start()
    shard = busiest_shard(ledger)
    time.sleep(4)
    source = placement(lab, shard)
    target = other_cluster(lab, source)
    version = map_version(lab)
    started = time.time()
    there = run_igops("shard", "move", str(shard), "--to", target, "--yes", "--json", env=env(lab))
    switched = time.time()
    assert there.returncode == 0, there.stderr
    moved = json.loads(there.stdout)["data"]
    assert moved["status"] == "done" and moved["map_version"] == version + 1
    assert moved["verify"]["equal"] and moved["verify"]["consistent"]
    assert 0 < moved["write_block_ms"] < 1000, moved
    assert placement(lab, shard) == target and schemas(lab, source, shard) == set()
    with_on_target = query(lab, target, f"SELECT max(id) FROM insta{shard}.photos")[0][0] or 0

    planned = run_igops("shard", "rebalance", "--dry-run", "--json", env=env(lab))
    assert planned.returncode == 0, planned.stderr
    proposal = json.loads(planned.stdout)["data"]["plan"]["moves"]
    assert [(m["source"], m["target"]) for m in proposal] == [(target, source)]

    time.sleep(6)
    landed = query(lab, target, f"SELECT count(*) FROM insta{shard}.photos WHERE id > %s", (with_on_target,))[0][0]
    assert landed > 0, "no photo reached the new place: the app did not follow the map"
    back_started = time.time()
    back = run_igops("shard", "move", str(shard), "--to", source, "--yes", "--json", env=env(lab))
    back_switched = time.time()
    assert back.returncode == 0, back.stderr
    assert placement(lab, shard) == source
    load.join()

    report = outcome["report"]
    assert report.writes_acked > 500 and report.write_errors == 0, report.errors_by_kind
    verified = verify_lab_ledger(ledger)
    assert verified.ok, verified.missing_writes[:5]
    assert gunicorn_pids() == pids, "the app servers were restarted"

    minted = ledger_ids(ledger, shard)
    assert len({entry[0] for entry in minted}) == len(minted)
    for move_started, move_switched in ((started, switched), (back_started, back_switched)):
        before = [i for i, _, acked in minted if acked < move_started]
        after = [i for i, sent, _ in minted if sent > move_switched]
        assert before and after, "the load wrote nothing to the moved shard around a move"
        assert min(after) > max(before)
    assert leftovers(lab) == []


def test_bad_input_is_refused_clearly_and_changes_nothing(lab, tmp_path):
    shard = 6
    source = placement(lab, shard)
    target = other_cluster(lab, source)

    def everything():
        return (
            map_version(lab),
            directory(lab, "SELECT count(*) FROM shard_moves")[0][0]
            if directory(lab, "SELECT to_regclass('shard_moves') IS NOT NULL")[0][0]
            else 0,
            schemas(lab, source, shard),
            schemas(lab, target, shard),
            leftovers(lab),
        )

    def refused(*args, code, text):
        result = run_igops("shard", "move", *args, "--yes", env=env(lab))
        assert result.returncode == code, result.stderr
        assert text in result.stderr and result.stderr.count("error:") == 1, result.stderr

    before = everything()
    refused("99", "--to", target, code=ExitCode.USAGE, text="shard 99 is out of range")
    refused(str(shard), "--to", "nowhere", code=ExitCode.USAGE, text="unknown Postgres cluster 'nowhere'")
    refused(str(shard), "--to", source, code=ExitCode.USAGE, text=f"shard {shard} is already on {source}")
    refused("--resume", "999999", code=ExitCode.USAGE, text="no shard move 999999")
    refused("--abort", "999999", code=ExitCode.USAGE, text="no shard move 999999")
    not_confirmed = run_igops("shard", "move", str(shard), "--to", target, env=env(lab), input="")
    assert not_confirmed.returncode == ExitCode.USAGE and "--yes" in not_confirmed.stderr

    query(lab, source, f"CREATE TABLE insta{shard}.hand_made (id bigint PRIMARY KEY)")
    try:
        refused(str(shard), "--to", target, code=ExitCode.REFUSED, text=f"{target} lacks table hand_made")
    finally:
        query(lab, source, f"DROP TABLE insta{shard}.hand_made")
    query(lab, source, f"CREATE TABLE insta{shard}.keyless (value int)")
    try:
        refused(str(shard), "--to", target, code=ExitCode.REFUSED, text="tables without a primary key: keyless")
    finally:
        query(lab, source, f"DROP TABLE insta{shard}.keyless")
    query(
        lab,
        target,
        f"CREATE SCHEMA insta{shard}; CREATE TABLE insta{shard}.users (id bigint PRIMARY KEY); "
        f"INSERT INTO insta{shard}.users VALUES (1)",
    )
    try:
        refused(str(shard), "--to", target, code=ExitCode.REFUSED, text=f"already has a schema insta{shard} with rows")
    finally:
        query(lab, target, f"DROP SCHEMA insta{shard} CASCADE")
    assert everything() == before

    done = directory(lab, "SELECT max(id) FROM shard_moves WHERE status = 'done'")[0][0]
    if done:
        refused("--resume", str(done), code=ExitCode.USAGE, text="nothing to resume")


def test_a_second_move_of_a_running_one_is_refused_and_verify_compares_at_one_point(lab, tmp_path):
    shard = 14
    source = placement(lab, shard)
    target = other_cluster(lab, source)
    first = PausedMove(lab, shard, target, "subscribed")
    move_id = latest_move_id(lab)
    try:
        again = run_igops("shard", "move", str(shard), "--to", target, "--yes", env=env(lab))
        assert (
            again.returncode == ExitCode.LOCKED
            and f"move {move_id} of shard {shard}" in again.stderr
            and "already running" in again.stderr
        ), again.stderr
        elsewhere = {**env(lab), "IGOPS_STATE_DIR": str(tmp_path / "other-host")}
        resumed = run_igops("shard", "move", "--resume", str(move_id), "--yes", env=elsewhere)
        assert resumed.returncode == ExitCode.LOCKED and "is held by shard-move" in resumed.stderr, resumed.stderr
        assert journal(lab, move_id)["state"] == "running"

        compared = run_igops("shard", "verify", str(shard), "--against", target, "--json", env=env(lab))
        assert compared.returncode == 0, compared.stderr
        report = json.loads(compared.stdout)["data"]
        assert report["consistent"] and report["equal"] and report["pause_ms"] < 1000
        assert {check["table"] for check in report["tables"]} == {"users", "photos", "likes", "following", "followers"}
    finally:
        first.kill()
        assert placement(lab, shard) == source
        assert wait_for(lambda: journal(lab, move_id)["state"] == "interrupted", 10)
        refused = run_igops("shard", "move", str(shard), "--to", target, "--yes", env=env(lab))
        assert refused.returncode == ExitCode.REFUSED and f"unfinished move {move_id}" in refused.stderr
        aborted = run_igops("shard", "move", "--abort", str(move_id), "--yes", env=env(lab))
        assert aborted.returncode == 0, aborted.stderr
    assert journal(lab, move_id)["status"] == "aborted"
    assert schemas(lab, target, shard) == set() and leftovers(lab) == []


@pytest.fixture(scope="module")
def background_load(lab, tmp_path_factory):
    """The load generator writing through the app for the whole series of kills."""
    ledger = tmp_path_factory.mktemp("shard-kills") / "ledger.jsonl"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.loadgen",
            "run",
            "--url",
            lb_url(lab),
            "--rate",
            "30",
            "--duration",
            "1800",
            "--users",
            str(LOAD_USERS),
            "--concurrency",
            "8",
            "--seed",
            "33",
            "--ledger",
            str(ledger),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        shard = busiest_shard(ledger)
        yield {"ledger": ledger, "shard": shard, "process": process}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()  # not left to load the lab under the tests that follow
                raise


@pytest.mark.parametrize("finish", ["resume", "abort"])
@pytest.mark.parametrize("point", shards.PAUSE_POINTS)
def test_sigkill_at_every_step_then_resume_or_abort(lab, background_load, point, finish):
    shard = background_load["shard"]
    source = placement(lab, shard)
    target = other_cluster(lab, source)
    PausedMove(lab, shard, target, point).kill()
    move_id = latest_move_id(lab)

    # The map never points at an incomplete copy: only a finished cut-over switches it.
    assert placement(lab, shard) == (target if point == "switched" else source)
    assert wait_for(lambda: journal(lab, move_id)["state"] == "interrupted", 10)
    if point == "fenced":
        assert schemas(lab, source, shard) == {f"insta{shard}_moved_{move_id}"}

    if finish == "abort" and point == "switched":
        refused = run_igops("shard", "move", "--abort", str(move_id), "--yes", env=env(lab))
        assert refused.returncode == ExitCode.REFUSED and "already switched" in refused.stderr
        finish = "resume"
    result = run_igops("shard", "move", f"--{finish}", str(move_id), "--yes", env=env(lab))
    assert result.returncode == 0, result.stderr
    record = journal(lab, move_id)
    if finish == "resume":
        assert record["status"] == "done" and record["step"] == "cleaned"
        assert placement(lab, shard) == target
        assert schemas(lab, target, shard) == {f"insta{shard}"} and schemas(lab, source, shard) == set()
    else:
        assert record["status"] == "aborted"
        assert placement(lab, shard) == source
        assert schemas(lab, source, shard) == {f"insta{shard}"} and schemas(lab, target, shard) == set()
    assert leftovers(lab) == []
    checked = run_igops("shard", "verify", str(shard), "--json", env=env(lab))
    assert checked.returncode == 0, checked.stdout[-1500:]


def test_nothing_written_during_the_kills_was_lost(lab, background_load):
    process = background_load["process"]
    assert process.poll() is None, "the load generator stopped early"
    process.send_signal(signal.SIGINT)
    process.wait(60)
    minted = ledger_ids(background_load["ledger"], background_load["shard"])
    assert len(minted) > 20, "the load barely wrote to the shard that was moved"
    assert len({entry[0] for entry in minted}) == len(minted)
    verified = verify_lab_ledger(background_load["ledger"])
    assert verified.ok, verified.missing_writes[:5]


def test_rebalance_runs_its_plan_with_the_move_code(lab):
    def layout():
        return Counter(cluster for _, cluster in directory(lab, "SELECT logical_shard, cluster FROM shard_map"))

    crowded = max(lab.model.postgres.clusters, key=lambda cluster: layout()[cluster])
    shard = max(
        shard for shard, cluster in directory(lab, "SELECT logical_shard, cluster FROM shard_map") if cluster != crowded
    )
    assert run_igops("shard", "move", str(shard), "--to", crowded, "--yes", env=env(lab)).returncode == 0
    planned = json.loads(run_igops("shard", "rebalance", "--dry-run", "--json", env=env(lab)).stdout)["data"]["plan"]
    assert planned["moves"] and all(move["source"] == crowded for move in planned["moves"])
    balanced = run_igops("shard", "rebalance", "--yes", "--json", env=env(lab))
    assert balanced.returncode == 0, balanced.stderr
    data = json.loads(balanced.stdout)["data"]
    assert data["failed"] is None and data["planned"] == len(data["results"]) == len(planned["moves"])
    assert all(result["status"] == "done" and result["source"] == crowded for result in data["results"])
    assert max(layout().values()) - min(layout().values()) <= 1
    again = run_igops("shard", "rebalance", "--dry-run", env=env(lab))
    assert again.returncode == 0 and "balanced: nothing to move" in again.stdout


def test_init_is_idempotent_and_the_map_adds_up(lab):
    version = map_version(lab)
    planned = run_igops("shard", "init", "--dry-run", "--json", env=env(lab))
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["data"]["plan"]["map_version"] == version
    assert "keep the shard map" in planned.stderr and "all exist" in planned.stderr
    again = run_igops("shard", "init", "--yes", "--json", env=env(lab))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["data"]["map_version"] == version == map_version(lab)
    shown = run_igops("shard", "map", "--json", env=env(lab))
    assert shown.returncode == 0, shown.stderr
    current = json.loads(shown.stdout)["data"]
    assert current["version"] == version and len(current["shards"]) == lab.model.shards.count
    assert all(item["present"] and item["bytes"] > 0 for item in current["shards"])
    for load in current["clusters"]:
        assert load["bytes"] == sum(item["bytes"] for item in current["shards"] if item["cluster"] == load["cluster"])


def test_moves_follow_a_switchover_the_inventory_does_not_know_of(lab):
    """After a switchover the inventory still names the old primary: moves find the new one."""

    def main_primary() -> str:
        status = json.loads(run_igops("pg", "status", "main", "--json", env=env(lab)).stdout)
        return status["data"]["clusters"][0]["primary"]

    home = main_primary()
    other = next(
        name
        for name in [lab.model.postgres.clusters["main"].primary, *lab.model.postgres.clusters["main"].standbys]
        if name != home
    )
    # The moves of the tests before wrote shards' worth of WAL to main: let the candidate catch up.
    wait_replayed(lab, home, other)
    switched = run_igops("pg", "switchover", "main", "--to", other, "--yes", env=env(lab))
    assert switched.returncode == 0, switched.stderr[-2000:]
    try:
        shard = max(
            shard
            for shard, cluster in directory(lab, "SELECT logical_shard, cluster FROM shard_map")
            if cluster != "main"
        )
        source = placement(lab, shard)
        for target in ("main", source):
            moved = run_igops("shard", "move", str(shard), "--to", target, "--yes", env=env(lab))
            assert moved.returncode == 0, moved.stderr[-2000:]
            assert placement(lab, shard) == target
        assert run_igops("shard", "verify", str(shard), env=env(lab)).returncode == 0
        assert leftovers(lab) == []
    finally:
        wait_replayed(lab, other, home)
        back = run_igops("pg", "switchover", "main", "--to", home, "--yes", env=env(lab))
        assert back.returncode == 0, back.stderr[-2000:]
        trim_wal(lab, home, other)


def interrupted_move_operation(lab) -> dict | None:
    """The latest interrupted shard-move operation, as `igops ops list` shows it."""
    from igops import operations_view

    found = [
        record
        for record in operations_view.list_operations(lab).records
        if record["status"] == "interrupted" and record["kind"] == "shard-move"
    ]
    return found[-1] if found else None


@pytest.mark.parametrize("finish", ["resume", "abort"])
def test_ops_resume_and_abort_finish_or_roll_back_an_interrupted_move(lab, finish):
    """The team's one way to continue any interrupted operation works for a shard move too: the
    operation journaled the id of the move it started."""
    shard = max(
        shard for shard, cluster in directory(lab, "SELECT logical_shard, cluster FROM shard_map") if cluster != "main"
    )
    source = placement(lab, shard)
    PausedMove(lab, shard, "main", "subscribed").kill()
    move_id = latest_move_id(lab)
    # Interrupted once its lease expires (the lab's etcd: its TTL).
    assert wait_for(lambda: interrupted_move_operation(lab) is not None, 30)
    operation = interrupted_move_operation(lab)
    finished = run_igops("ops", finish, operation["id"], "--yes", env=env(lab))
    assert finished.returncode == 0, finished.stderr[-2000:]
    record = journal(lab, move_id)
    if finish == "resume":
        assert record["status"] == "done" and placement(lab, shard) == "main"
        back = run_igops("shard", "move", str(shard), "--to", source, "--yes", env=env(lab))
        assert back.returncode == 0, back.stderr[-2000:]
    else:
        assert record["status"] == "aborted"
    assert placement(lab, shard) == source and leftovers(lab) == []
    assert run_igops("shard", "verify", str(shard), env=env(lab)).returncode == 0


def test_a_move_whose_slot_was_invalidated_copies_again_on_resume(lab):
    """A move left behind holds WAL on its source; past max_slot_wal_keep_size Postgres invalidates
    the slot instead of filling the WAL volume, and a resumed move starts its copy again."""
    shard = max(
        shard for shard, cluster in directory(lab, "SELECT logical_shard, cluster FROM shard_map") if cluster != "main"
    )
    source = placement(lab, shard)
    PausedMove(lab, shard, "main", "subscribed").kill()
    move_id = latest_move_id(lab)
    slot = f"igops_move_{move_id}"
    query(lab, "main", f"ALTER SUBSCRIPTION {slot} DISABLE")
    connection = pg(lab, source)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_size_bytes(current_setting('max_slot_wal_keep_size'))")
            segments = cursor.fetchone()[0] // (16 << 20) + 2
            for _ in range(segments):
                cursor.execute("SELECT pg_logical_emit_message(false, 'igops-test', 'past the slot')")
                cursor.execute("SELECT pg_switch_wal()")
            cursor.execute("CHECKPOINT")
            cursor.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            assert cursor.fetchone() == ("lost",)
    finally:
        connection.close()

    resumed = run_igops("shard", "move", "--resume", str(move_id), "--yes", env=env(lab))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "invalidated" in resumed.stderr
    assert journal(lab, move_id)["status"] == "done" and placement(lab, shard) == "main"
    assert run_igops("shard", "verify", str(shard), env=env(lab)).returncode == 0
    status = json.loads(run_igops("pg", "status", source, "--json", env=env(lab)).stdout)["data"]["clusters"][0]
    trim_wal(lab, status["primary"], next(node["name"] for node in status["nodes"] if node["role"] == "standby"))
    back = run_igops("shard", "move", str(shard), "--to", source, "--yes", env=env(lab))
    assert back.returncode == 0, back.stderr[-2000:]
    assert placement(lab, shard) == source and leftovers(lab) == []


def test_the_wait_for_the_target_ends_while_a_transaction_on_the_source_writes_a_record(lab):
    """Verification and the cut-over wait until the target has applied the source's WAL past
    every commit. An open transaction on the source whose last record crosses a WAL page leaves
    the source's WAL position at that page's boundary, inside the record: the WAL writer writes
    whole pages, a walsender decodes whole flushed records, and on an idle source nothing
    flushes the rest. Waiting for that position gave up ("did not apply the source's WAL up to
    0/11012000 within 2000 ms", three times over on a fresh machine)."""
    shard = max(
        shard for shard, cluster in directory(lab, "SELECT logical_shard, cluster FROM shard_map") if cluster != "main"
    )
    source = placement(lab, shard)
    target = other_cluster(lab, source)
    move = PausedMove(lab, shard, target, "caught_up")
    move_id = latest_move_id(lab)
    writer = pg(lab, source)
    try:
        with writer.cursor() as cursor:

            def inside_a_record() -> bool:
                cursor.execute(
                    "SELECT pg_current_wal_lsn() = pg_current_wal_flush_lsn() "
                    "AND pg_current_wal_lsn() < pg_current_wal_insert_lsn() "
                    "AND (pg_current_wal_lsn() - '0/0'::pg_lsn) % 8192 = 0"
                )
                return cursor.fetchone()[0]

            for _ in range(5):  # any commit elsewhere on the source flushes the record: try again
                cursor.execute("BEGIN")
                cursor.execute("SELECT pg_logical_emit_message(true, 'igops-test', repeat('x', 20000))")
                if wait_for(inside_a_record, 10, 0.01):
                    break
                cursor.execute("ROLLBACK")
            else:
                raise AssertionError("the source's WAL position never stopped inside the open transaction's record")
            compared = run_igops("shard", "verify", str(shard), "--against", target, "--json", env=env(lab))
            assert compared.returncode == 0, compared.stderr[-2000:]
            assert json.loads(compared.stdout)["data"]["consistent"]
            cursor.execute("ROLLBACK")
    finally:
        writer.close()
        move.kill()
        aborted = run_igops("shard", "move", "--abort", str(move_id), "--yes", env=env(lab))
        assert aborted.returncode == 0, aborted.stderr
    assert placement(lab, shard) == source and leftovers(lab) == []


def test_nothing_is_dropped_before_the_target_has_flushed_the_shard(lab):
    """The subscription commits asynchronously: a change the target applied is durable only once
    the target has flushed it. A resumed move that finds the source fenced switches the map only
    once the target has applied and flushed everything up to a mark written then: with its
    subscription disabled, the map stays and nothing is dropped. And after the switch, until the
    target confirms the flush the slot and the old copy are what could bring a change back: a
    resumed cleanup whose target cannot confirm it must drop neither, and finish once it does."""
    shard = max(
        shard for shard, cluster in directory(lab, "SELECT logical_shard, cluster FROM shard_map") if cluster != "main"
    )
    source = placement(lab, shard)
    target = other_cluster(lab, source)
    PausedMove(lab, shard, target, "fenced").kill()
    move_id = latest_move_id(lab)
    slot = f"igops_move_{move_id}"
    everything = sorted(
        [
            f"{source} slot {slot}",
            f"{source} publication {slot}",
            f"{target} subscription {slot}",
            f"{source} old copy insta{shard}_moved_{move_id}",
        ]
    )
    idle = "SELECT NOT active FROM pg_replication_slots WHERE slot_name = %s"
    query(lab, target, f"ALTER SUBSCRIPTION {slot} DISABLE")
    # The apply worker ends a moment after DISABLE returns, and may apply and confirm what it
    # receives meanwhile: the slot must be idle before igops writes its mark.
    assert wait_for(lambda: query(lab, source, idle, (slot,))[0][0], 10, 0.1), "the slot is still in use"
    unswitched = run_igops("shard", "move", "--resume", str(move_id), "--yes", env=env(lab))
    assert unswitched.returncode == ExitCode.FAILED, unswitched.stderr[-2000:]
    assert "has not applied and flushed" in unswitched.stderr, unswitched.stderr[-2000:]
    assert placement(lab, shard) == source and sorted(leftovers(lab)) == everything
    query(lab, target, f"ALTER SUBSCRIPTION {slot} ENABLE")

    PausedMove(lab, shard, target, "switched", resume=move_id).kill()
    assert placement(lab, shard) == target
    query(lab, target, f"ALTER SUBSCRIPTION {slot} DISABLE")
    assert wait_for(lambda: query(lab, source, idle, (slot,))[0][0], 10, 0.1), "the slot is still in use"
    # The target has most likely confirmed the mark the map switched at by now: as if it had not,
    # the journal's mark is moved past WAL written now, which it cannot confirm while disabled.
    mark = query(lab, source, "SELECT pg_logical_emit_message(true, 'igops-test', 'not yet confirmed')")[0][0]
    directory(lab, "UPDATE shard_moves SET source_lsn = %s WHERE id = %s", (mark, move_id))
    held = run_igops("shard", "move", "--resume", str(move_id), "--yes", env=env(lab))
    assert held.returncode == ExitCode.FAILED, held.stderr[-2000:]
    assert "has not confirmed flushing" in held.stderr and "nothing was dropped" in held.stderr, held.stderr[-2000:]
    assert placement(lab, shard) == target and sorted(leftovers(lab)) == everything
    query(lab, target, f"ALTER SUBSCRIPTION {slot} ENABLE")
    finished = run_igops("shard", "move", "--resume", str(move_id), "--yes", env=env(lab))
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert journal(lab, move_id)["status"] == "done" and leftovers(lab) == []
    back = run_igops("shard", "move", str(shard), "--to", source, "--yes", env=env(lab))
    assert back.returncode == 0, back.stderr[-2000:]
    assert placement(lab, shard) == source and leftovers(lab) == []


def test_the_cut_over_compares_the_rows_written_since_the_verification_and_no_others(lab):
    """With writes held, the cut-over reads what was written since the verification (keys decoded
    from a temporary slot on the source), not every row of the shard: a changed value among them
    is found, and a table truncated since is compared whole. Two schemas on main stand for the
    source and the target copy."""
    from igops.shard_changes import ChangedRows

    source, target = "igops_changes_a", "igops_changes_b"
    connection, tracked = pg(lab, "main"), pg(lab, "main")

    def on_both(sql):
        with connection.cursor() as cursor:
            for schema in (source, target):
                cursor.execute(sql.format(schema=schema))

    try:
        on_both(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};"
            "CREATE TABLE {schema}.events (id bigint PRIMARY KEY, body json, note text);"
            "INSERT INTO {schema}.events SELECT g, json_build_object('n', g), 'e' || g"
            "  FROM generate_series(1, 20000) g;"
            "CREATE TABLE {schema}.pairs (a int, b text, v int, PRIMARY KEY (a, b));"
            "INSERT INTO {schema}.pairs SELECT g, 'b' || g, g FROM generate_series(1, 100) g"
        )
        query(
            lab,
            "main",
            f"DROP PUBLICATION IF EXISTS igops_changes_test; "
            f"CREATE PUBLICATION igops_changes_test FOR TABLES IN SCHEMA {source}",
        )
        changes = ChangedRows(
            tracked, "igops_changes_test", "igops_changes_test", source, {"events": ("id",), "pairs": ("a", "b")}
        )
        changes.start()
        writes = (
            "INSERT INTO {schema}.events VALUES (20001, '{{}}', 'new');"
            "UPDATE {schema}.events SET note = 'changed' WHERE id = 5;"
            "DELETE FROM {schema}.events WHERE id = 7;"
            "UPDATE {schema}.pairs SET b = 'moved' WHERE a = 1"
        )
        on_both(writes)
        with connection.cursor() as cursor:
            cursor.execute(f"BEGIN; INSERT INTO {source}.events VALUES (30000, NULL, 'rolled back'); ROLLBACK")
        assert changes.drain() == 4
        assert changes.keys == {"events": {("20001",), ("5",), ("7",)}, "pairs": {("1", "b1"), ("1", "moved")}}

        with connection.cursor() as left, tracked.cursor() as right:
            rows, differences = changes.compare((left, right), (source, target))
        assert (rows, differences) == (3, [])  # 20001, 5 and the moved pair; 7 is gone from both

        query(lab, "main", f"UPDATE {target}.events SET note = 'drifted' WHERE id = 5")
        with connection.cursor() as left, tracked.cursor() as right:
            rows, differences = changes.compare((left, right), (source, target))
        assert rows == 3 and differences == ["events: values differ among the 3 keys written since the verification"]

        query(lab, "main", f"TRUNCATE {source}.pairs")
        assert changes.drain() == 1 and changes.truncated == {"pairs"}
        with connection.cursor() as left, tracked.cursor() as right:
            _, differences = changes.compare((left, right), (source, target))
        assert differences[-1] == "pairs: rows 0 vs 100 (the whole table: truncated or new)"
        changes.close()
        assert query(lab, "main", "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'igops_changes_test'") == []
    finally:
        tracked.close()
        query(lab, "main", "DROP PUBLICATION IF EXISTS igops_changes_test")
        on_both("DROP SCHEMA IF EXISTS {schema} CASCADE")
        connection.close()


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered-md5", "row-hash"])
def test_verification_finds_a_changed_a_missing_and_an_extra_row_and_names_the_range(lab, ordered):
    """Both ways of comparing two copies (ordered checksums for `shard verify`, the row hash a
    move waits on) on copies that differ by one changed value (in a json column, which has no
    hash function), one missing and one extra row."""
    connection = pg(lab, "main")
    left, right = shard_verify.ShardCopy("main", "igops_verify_a"), shard_verify.ShardCopy("main", "igops_verify_b")
    try:
        with connection.cursor() as cursor:
            for copy in (left, right):
                cursor.execute(
                    f"DROP SCHEMA IF EXISTS {copy.schema} CASCADE; CREATE SCHEMA {copy.schema};"
                    f"CREATE TABLE {copy.schema}.events (id bigint PRIMARY KEY, body json, note text);"
                    f"INSERT INTO {copy.schema}.events SELECT g, json_build_object('n', g), 'e' || g"
                    f"  FROM generate_series(1, 250000) g;"
                    f"CREATE TABLE {copy.schema}.tags (id bigint PRIMARY KEY, tag text);"
                    f"INSERT INTO {copy.schema}.tags SELECT g, 't' || g FROM generate_series(1, 1000) g"
                )

        def compare():
            readers = [pg(lab, "main") for _ in (left, right)]
            try:
                for reader in readers:
                    reader.autocommit = False
                    reader.set_session(isolation_level="REPEATABLE READ", readonly=True)
                with readers[0].cursor() as one, readers[1].cursor() as other:
                    return shard_verify.compare_snapshots(7, (left, right), (one, other), False, None, ordered)
            finally:
                for reader in readers:
                    reader.close()

        same = compare()
        assert same.equal and [check.rows[left.label] for check in same.tables] == [250000, 1000]
        with connection.cursor() as cursor:
            cursor.execute(f"UPDATE {right.schema}.events SET body = '{{\"n\": -1}}' WHERE id = 123456")
        changed = compare()
        assert not changed.equal
        [events, tags] = changed.tables
        assert (events.equal, tags.equal) == (False, True)
        assert events.rows[left.label] == events.rows[right.label]
        assert events.first_difference == "id in [100000, 200000)"
        with connection.cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {right.schema}.events WHERE id = 123456;"
                f"INSERT INTO {right.schema}.events VALUES (250001, '{{}}', 'extra')"
            )
        swapped = compare().tables[0]
        assert not swapped.equal and swapped.rows[left.label] == swapped.rows[right.label]
        assert swapped.first_difference == "id in [100000, 200000)"
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP SCHEMA IF EXISTS {left.schema}, {right.schema} CASCADE")
        connection.close()


def test_a_move_goes_through_an_autovacuum_of_a_shard_table(lab):
    """An autovacuum holds a lock the verification's and the cut-over's EXCLUSIVE lock waits for,
    and on a big table (after a bulk delete, say) it runs for minutes. The server cancels an
    autovacuum that blocks a lock request, but at the requester's deadlock check, deadlock_timeout
    (1 s) after it began to wait: the move's lock gave up at 1 s, three times, and so did the
    move ("insta13's tables could not be locked within 1000 ms"). Here a throttled autovacuum
    of the shard's likes table (100 ms asleep per page) runs when the move starts, and is started
    again, a second after each cancel, for as long as its dead rows are there."""
    shard = min(shard for shard, cluster in directory(lab, "SELECT logical_shard, cluster FROM shard_map"))
    source = placement(lab, shard)
    target = other_cluster(lab, source)
    likes = f"insta{shard}.likes"
    query(
        lab,
        source,
        f"INSERT INTO {likes} (photo_id, user_id) SELECT -n, -n FROM generate_series(1, 20000) AS n;"
        f"DELETE FROM {likes} WHERE photo_id < 0;"
        f"ALTER TABLE {likes} SET (autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0, "
        "autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1)",
    )
    query(lab, source, "ALTER SYSTEM SET autovacuum_naptime = '1s'")
    query(lab, source, "SELECT pg_reload_conf()")
    try:
        assert wait_for(
            lambda: (
                query(
                    lab,
                    source,
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker' AND query LIKE %s",
                    (f"%{likes}%",),
                )[0][0]
                == 1
            ),
            60,
            0.1,
        ), "no autovacuum of the likes table started"
        moved = run_igops("shard", "move", str(shard), "--to", target, "--yes", "--json", env=env(lab))
        assert moved.returncode == 0, moved.stderr[-2000:]
        assert placement(lab, shard) == target
    finally:
        query(lab, source, "ALTER SYSTEM RESET autovacuum_naptime")
        query(lab, source, "SELECT pg_reload_conf()")
        if placement(lab, shard) == source:
            query(
                lab,
                source,
                f"ALTER TABLE {likes} RESET (autovacuum_vacuum_threshold, autovacuum_vacuum_scale_factor, "
                "autovacuum_vacuum_cost_delay, autovacuum_vacuum_cost_limit)",
            )
    back = run_igops("shard", "move", str(shard), "--to", source, "--yes", env=env(lab))
    assert back.returncode == 0, back.stderr[-2000:]
    assert placement(lab, shard) == source and leftovers(lab) == []


def test_a_drain_longer_than_the_idle_transaction_timeout_does_not_fail_the_cut_over(lab, monkeypatch):
    """Before taking its lock, the cut-over reads what the source wrote since the verification
    from a temporary slot: all of the source's WAL since then is decoded, which after a bulk load
    or an autovacuum freezing a big table took longer than the 10 s of
    idle_in_transaction_session_timeout its locking session runs with. That session had begun a
    transaction reading the schema's shape, the server ended it while idle, and the move failed
    ("server closed the connection unexpectedly"). Here the drain before the lock is made slow."""
    from igops import shard_locks
    from igops.output import Reporter
    from igops.shard_changes import ChangedRows

    shard = min(shard for shard, cluster in directory(lab, "SELECT logical_shard, cluster FROM shard_map"))
    source = placement(lab, shard)
    target = other_cluster(lab, source)
    idle_timeout_s = int(shard_locks.LOCK_SETTINGS["idle_in_transaction_session_timeout"].removesuffix("s"))
    drain = ChangedRows.drain
    slowed = []

    def slow_drain(self, upto=None):
        if upto is None and not slowed:  # the cut-over's first drain, before its lock
            slowed.append(time.monotonic())
            time.sleep(idle_timeout_s + 1)
        return drain(self, upto)

    monkeypatch.setattr(ChangedRows, "drain", slow_drain)
    result = shards.start_move(lab, shards.plan_move(lab, shard, target), Reporter())
    assert slowed and result.status == "done" and placement(lab, shard) == target
    monkeypatch.setattr(ChangedRows, "drain", drain)
    back = run_igops("shard", "move", str(shard), "--to", source, "--yes", env=env(lab))
    assert back.returncode == 0, back.stderr[-2000:]
    assert placement(lab, shard) == source and leftovers(lab) == []


def test_an_abort_whose_target_is_down_drops_the_sources_slot_and_finishes_once_the_target_is_back(lab):
    """The target's Postgres stops in the middle of a move (its disk filled during the copy, say).
    `--abort` could not reach the target and stopped there, leaving the source's slot to hold its
    WAL without end (with max_slot_wal_keep_size = -1, until the WAL volume filled and the primary,
    with every other shard on it, stopped). Now the abort drops the source's slot and publication
    anyway, says what the target may still hold and leaves the move unfinished; once the target is
    back, `--abort` again finishes it."""
    from igops.lab.postgres import Node, repmgrd_wanted

    if repmgrd_wanted(state.paths(), None):
        pytest.skip("repmgrd would promote the target's standby: the target would not stay down")
    source = lab.model.shards.directory_cluster  # the journal must stay reachable
    target = other_cluster(lab, source)
    shard = min(
        shard for shard, cluster in directory(lab, "SELECT logical_shard, cluster FROM shard_map") if cluster == source
    )
    PausedMove(lab, shard, target, "caught_up").kill()
    move_id = latest_move_id(lab)
    slot = f"igops_move_{move_id}"
    assert wait_for(lambda: journal(lab, move_id)["state"] == "interrupted", 10)
    status = json.loads(run_igops("pg", "status", target, "--json", env=env(lab)).stdout)["data"]["clusters"][0]
    node = Node(state.paths(), status["primary"])

    def target_answers() -> bool:
        try:
            return query(lab, target, "SELECT NOT pg_is_in_recovery()") == [(True,)]
        except Exception:  # noqa: BLE001 - not up yet
            return False

    node.stop()
    try:
        assert not target_answers()
        half = run_igops("shard", "move", "--abort", str(move_id), "--yes", env=env(lab))
        assert half.returncode == ExitCode.FAILED, half.stderr[-2000:]
        assert f"abort of move {move_id} unfinished" in half.stderr, half.stderr[-2000:]
        assert f"may still hold subscription {slot} and the partial copy (schema insta{shard})" in half.stderr
        assert f"no member of Postgres cluster {target} accepts writes" in half.stderr
        # The source holds no WAL for the target any more, and serves the shard.
        assert query(lab, source, "SELECT slot_name FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == []
        assert query(lab, source, "SELECT pubname FROM pg_publication WHERE pubname = %s", (slot,)) == []
        assert schemas(lab, source, shard) == {f"insta{shard}"} and placement(lab, shard) == source
        record = journal(lab, move_id)
        assert record["status"] == "active" and record["state"] == "failed", record
        assert f"--abort {move_id}" in record["error"]
    finally:
        node.start()
    assert wait_for(target_answers, 60, 0.5), f"{status['primary']} did not come back as {target}'s primary"
    assert query(lab, target, "SELECT subname FROM pg_subscription WHERE subname = %s", (slot,)) == [(slot,)]
    again = run_igops("shard", "move", "--abort", str(move_id), "--yes", env=env(lab))
    assert again.returncode == 0, again.stderr[-2000:]
    assert journal(lab, move_id)["status"] == "aborted"
    assert schemas(lab, target, shard) == set() and leftovers(lab) == []
    assert run_igops("shard", "verify", str(shard), env=env(lab)).returncode == 0
