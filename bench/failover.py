"""Switchovers under the same write load, igops against the bare procedure each replaces.

- Postgres: `igops pg switchover` against a plain `repmgr standby switchover` with PgBouncer left
  alone (as repmgr does: it never touches PgBouncer).
- Redis: `igops redis switchover` against a bare `REPLICAOF NO ONE` on the replica, the
  directory's redis_master repointed, and `REPLICAOF` on the old master: no write pause.

Each method runs ROUND_TRIPS round trips (primary or master away and back) while the app's load
generator writes through the load balancer (~110 writes/s). Reported: client errors,
acknowledged writes lost (the ledger verified against Postgres, Redis and S3), and the longest
write stall: the longest stretch without an acknowledged write that needs the store being
switched (for Postgres, the writes on cluster main's shards and every sign-up, which claims its
name in the directory; for Redis, sign-ups and posts). Needs the lab (`igops lab up`, as root);
holds the lab's test lock for the whole run and leaves db1 and redis1 as primary and master.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.ids import shard_of  # noqa: E402
from app.loadgen import run_load  # noqa: E402
from app.loadgen.ledger import read_ledger  # noqa: E402
from app.loadgen.report import longest_gap  # noqa: E402
from app.loadgen.verify import verify_ledger  # noqa: E402
from igops import failover, inventory, redisops, shard_map  # noqa: E402
from igops.lab import aws, state  # noqa: E402

LOCK = Path(os.environ.get("IGOPS_LAB_TEST_LOCK", "/tmp/igops-lab-tests.lock"))
RATE, WRITE_RATIO, CONCURRENCY = 130, 0.85, 32
ROUND_TRIPS = 2
BETWEEN = 6.0  # seconds between the two switchovers of a round trip, and after the last
STALL_GOAL_S = 0.3  # p99 of igops pg switchover's write stall
IGOPS = [sys.executable, "-m", "igops"]


@dataclass
class Outcome:
    method: str
    switchovers: int
    failed_switchovers: int
    errors: int
    lost: int
    stall_s: float
    writes_per_s: float
    # Each switchover's own stall: the longest stretch without an acknowledged write that
    # overlaps the switchover's command, in the order they ran.
    stalls_s: list[float]


def igops(fleet, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*IGOPS, "-c", str(fleet.source), *args, "--yes", "--json"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=600,
    )


def under_load(fleet, work: Path, name: str, switch, targets: list[str], touches) -> Outcome:
    """Run the load, switch to each target in turn once its timed phase has begun, verify."""
    ledger = work / f"{name}.jsonl"
    # An upper bound: the load stops once the last switchover's quiet time is over.
    duration = len(targets) * (BETWEEN + 60) + 6
    done = threading.Event()
    result = {}
    lb = fleet.with_role("lb")[0]
    thread = threading.Thread(
        target=lambda: result.update(
            report=run_load(
                url=f"http://{lb.address}:{fleet.model.lb.port}",
                rate=RATE,
                duration=duration,
                ledger=ledger,
                users=30,
                write_ratio=WRITE_RATIO,
                concurrency=CONCURRENCY,
                seed=5,
                stop=done,
            )
        ),
        daemon=True,
    )
    thread.start()
    while not (ledger.exists() and '"op":"post"' in ledger.read_text()):
        time.sleep(0.2)
    failed, windows = 0, []
    for target in targets:
        time.sleep(BETWEEN / 2)
        began = time.time()  # the ledger's clock
        failed += not switch(target)
        windows.append((began, time.time()))
        time.sleep(BETWEEN / 2)
    done.set()
    thread.join()
    report = result["report"]
    verified = verify_ledger(ledger, state.paths().app_root("app1") / "shared" / "app.toml")
    records, _ = read_ledger(ledger)
    timed = [record for record in records if record["op"] in ("post", "like")]
    start, end = min(r["acked"] for r in timed), max(r["acked"] for r in records)
    acked = sorted(r["acked"] for r in records if touches(r))
    stall = longest_gap(acked, start, end)
    stalls = [round(stall_during(acked, began, ended), 3) for began, ended in windows]
    return Outcome(
        name,
        len(targets),
        failed,
        report.errors,
        len(verified.missing_writes),
        round(stall, 3),
        report.writes_per_s,
        stalls,
    )


def stall_during(acked: list[float], began: float, ended: float) -> float:
    """The longest stretch between two acknowledged writes (sorted `acked`) that overlaps
    [began, ended]: the stall one switchover caused, whether it began before the command's
    pause or ran past its return."""
    longest = 0.0
    for before, after in itertools.pairwise(acked):
        if after >= began and before <= ended:
            longest = max(longest, after - before)
    return longest


def main_shards(fleet) -> set[int]:
    connection = shard_map.directory_connection(fleet)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT logical_shard FROM shard_map WHERE cluster = 'main'")
            return {row[0] for row in cursor.fetchall()}
    finally:
        connection.close()


def touches_main(shards: set[int]):
    def touches(record) -> bool:
        if record["op"] == "signup":
            return True
        return shard_of(record.get("photo_id") or record["user_id"]) in shards

    return touches


def touches_redis(record) -> bool:
    return record["op"] in ("signup", "post")


def igops_pg(fleet, pauses: list[float]):
    """igops' switchover; `pauses` gets each one's PgBouncer write pause (its --json), in ms."""

    def switch(target: str) -> bool:
        done = igops(fleet, "pg", "switchover", "main", "--to", target)
        if done.returncode:
            print(f"  igops pg switchover --to {target} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        else:
            paused = ((json.loads(done.stdout).get("data") or {}).get("result") or {}).get("write_pause_ms")
            if paused is not None:
                pauses.append(float(paused))
        return done.returncode == 0

    return switch


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile: of 10 values, p99 is the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def repmgr_pg(fleet):
    """What an operator runs on the standby: repmgr's own switchover. PgBouncer keeps its routes."""

    def switch(target: str) -> bool:
        host = fleet.host(target)
        done = subprocess.run(
            [
                "runuser",
                "-u",
                fleet.model.postgres.os_user,
                "--",
                "env",
                "-C",
                "/",
                f"{fleet.model.postgres.bin_dir}/repmgr",
                "-f",
                fleet.path_for(fleet.model.postgres.repmgr_config, host),
                "standby",
                "switchover",
                "--siblings-follow",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode:
            print(f"  repmgr standby switchover to {target} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return done.returncode == 0

    return switch


def igops_redis(fleet):
    def switch(target: str) -> bool:
        done = igops(fleet, "redis", "switchover", "--to", target)
        if done.returncode:
            print(f"  igops redis switchover --to {target} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return done.returncode == 0

    return switch


def bare_redis(fleet):
    """Promote, repoint, demote, as fast as a script can: no pause, so the old master keeps
    acknowledging writes until it is demoted."""

    def switch(target: str) -> bool:
        old = failover.redis_status(fleet).app_master
        address = (str(fleet.host(target).address), fleet.model.redis.port)
        new_master, old_master = redisops.client(fleet, fleet.host(target)), redisops.client(fleet, fleet.host(old))
        try:
            redisops.replicate_from(new_master, None)
            directory = shard_map.directory_connection(fleet)
            try:
                redisops.write_endpoint(directory, f"{address[0]}:{address[1]}")
            finally:
                directory.close()
            redisops.replicate_from(old_master, address)
        finally:
            new_master.close()
            old_master.close()
        return True

    return switch


def restore(fleet) -> None:
    """db1 primary with PgBouncer routing to it, redis1 the app's master (what the tests expect)."""
    main = failover.pg_status(fleet, "main")
    if main.primary != "db1" or any(t != "db1" for table in main.pgbouncer.values() for t in table.values()):
        igops(fleet, "pg", "switchover", "main", "--to", "db1")
    for node in failover.pg_status(fleet, "main").nodes:
        if node.role == "standby" and node.streaming_from != "db1":
            igops(fleet, "pg", "rejoin", node.name, "--force")
    redis = failover.redis_status(fleet)
    if redis.app_master != "redis1" or redis.node("redis1").role != "master":
        igops(fleet, "redis", "switchover", "--to", "redis1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "pg", "redis"], default="all")
    parser.add_argument(
        "--switchovers", type=int, default=ROUND_TRIPS * 2, help="per method (an even number: away and back)"
    )
    args = parser.parse_args()
    if args.switchovers < 2 or args.switchovers % 2:
        parser.error("--switchovers: an even number, at least 2")
    os.environ.update(aws.AWS_ENV)
    fleet = inventory.load_file(state.paths().inventory)
    work = Path(f"/tmp/igops-bench-failover-{os.getpid()}")
    work.mkdir()
    trips = ["db2", "db1"] * (args.switchovers // 2)
    pauses: list[float] = []
    outcomes = []
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        restore(fleet)
        if args.part in ("all", "pg"):
            shards = main_shards(fleet)
            outcomes.append(
                under_load(fleet, work, "igops pg switchover", igops_pg(fleet, pauses), trips, touches_main(shards))
            )
            restore(fleet)
            outcomes.append(
                under_load(fleet, work, "repmgr standby switchover", repmgr_pg(fleet), trips, touches_main(shards))
            )
            restore(fleet)
        if args.part in ("all", "redis"):
            redis_trips = ["redis2", "redis1"] * (args.switchovers // 2)
            outcomes.append(
                under_load(fleet, work, "igops redis switchover", igops_redis(fleet), redis_trips, touches_redis)
            )
            restore(fleet)
            outcomes.append(
                under_load(fleet, work, "REPLICAOF NO ONE + repoint", bare_redis(fleet), redis_trips, touches_redis)
            )
            restore(fleet)
    print(
        f"failover: {args.switchovers} switchovers per method under {RATE} req/s ({WRITE_RATIO:.0%} writes) "
        "through the load balancer"
    )
    print(
        f"{'method':<28} {'switchovers':>11} {'failed':>6} {'client errors':>13} {'lost writes':>11} "
        f"{'longest stall':>13} {'writes/s':>8}"
    )
    for outcome in outcomes:
        print(
            f"{outcome.method:<28} {outcome.switchovers:>11} {outcome.failed_switchovers:>6} {outcome.errors:>13} "
            f"{outcome.lost:>11} {outcome.stall_s:>12.2f}s {outcome.writes_per_s:>8.0f}"
        )
    if pauses:
        ours = outcomes[0]
        print(
            f"igops pg switchover, each one's stall (s): {', '.join(f'{x:.2f}' for x in ours.stalls_s)}; p50 "
            f"{percentile(ours.stalls_s, 0.5):.2f} s, p99 {percentile(ours.stalls_s, 0.99):.2f} s (goal <= "
            f"{STALL_GOAL_S} s: {'met' if percentile(ours.stalls_s, 0.99) <= STALL_GOAL_S else 'MISSED'}); "
            f"PgBouncer's write pause (ms): p50 {percentile(pauses, 0.5):.0f}, max {max(pauses):.0f}"
        )
    for ours, theirs in zip(outcomes[::2], outcomes[1::2], strict=True):
        print(
            f"{theirs.method} vs {ours.method}: errors {theirs.errors} vs {ours.errors}, lost writes {theirs.lost} "
            f"vs {ours.lost}, stall {theirs.stall_s / max(ours.stall_s, 0.001):.1f}x longer"
        )
    print(json.dumps([outcome.__dict__ for outcome in outcomes]))


if __name__ == "__main__":
    main()
