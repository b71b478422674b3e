"""Moving a logical shard of about a million rows between the lab's clusters: `igops shard move`
(online: logical replication, brief write block at the cut-over) against the offline pipe
`pg_dump -n SCHEMA | psql` with the shard's tables locked IN EXCLUSIVE MODE for the whole copy,
as a move without replication has to be done. Goals: writes blocked at most 50 ms; total time at
most the pipe's (1.0x).

For each method: total wall time, and how long writes to the shard were blocked, measured twice:
igops' own journal (lock request to map switch), and a probe that writes into the shard every
10 ms through PgBouncer with the app's own connection, directory and retry code; its longest
wait for an acknowledgement is what a user of the shard would have seen. Also what the cut-over
checks with writes held (the rows written since its verification), against what counting every
row of both copies, as the cut-over once did with writes held, takes on the same shard.

Runs in the lab (`igops lab up`), holding the lab's test lock throughout. The shard (default 13)
gets ~1M rows of bench data, moves to the other cluster and back with igops, and loses the
bench data at the end: the lab is left as it was.
Run as root: .venv/bin/python bench/shard_move.py [--shard N] [--rows N]
(about 160 MB a million rows with indexes: the lab's 448 MB data volumes hold about 2 million.)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from igops import inventory, shards  # noqa: E402
from igops.lab import state  # noqa: E402
from igops.output import human_bytes  # noqa: E402
from igops.postgres_admin import connect, primary_of  # noqa: E402
from igops.secrets import Secrets  # noqa: E402

LAB_LOCK = Path(os.environ.get("IGOPS_LAB_TEST_LOCK", "/tmp/igops-lab-tests.lock"))
BIN = Path("/usr/lib/postgresql/15/bin")
CAPTION = "igops-bench"
# Share of the rows per table: like the service, mostly likes and photos.
MIX = {"users": 0.1, "photos": 0.3, "likes": 0.6}


def sql(fleet, cluster, text, params=()):
    connection = connect(fleet, cluster, fleet.model.postgres.database, autocommit=True, purpose="bench")
    try:
        with connection.cursor() as cursor:
            cursor.execute(text, params)
            return cursor.fetchall() if cursor.description else None
    finally:
        connection.close()


def fill(fleet, cluster, shard, rows):
    schema = f"insta{shard}"
    users, photos = int(rows * MIX["users"]), int(rows * MIX["photos"])
    likes = rows - users - photos
    sql(
        fleet,
        cluster,
        f"""
        INSERT INTO {schema}.users (id, username)
             SELECT {schema}.next_id(), 'igops_bench_' || g FROM generate_series(1, %s) g;
        INSERT INTO {schema}.photos (id, user_id, s3_key, caption)
             SELECT {schema}.next_id(), 0, 'photos/bench/' || g, %s FROM generate_series(1, %s) g;
        INSERT INTO {schema}.likes (photo_id, user_id)
             SELECT p.id, u.n FROM (SELECT id FROM {schema}.photos WHERE caption = %s ORDER BY id LIMIT %s) p
                  CROSS JOIN generate_series(1, %s) AS u(n);
        ANALYZE {schema}.users; ANALYZE {schema}.photos; ANALYZE {schema}.likes;""",
        (users, CAPTION, photos, CAPTION, (likes + 1) // 2, 2),
    )
    return sum(
        row[0]
        for row in sql(
            fleet,
            cluster,
            f"""
        SELECT count(*) FROM {schema}.users UNION ALL SELECT count(*) FROM {schema}.photos
        UNION ALL SELECT count(*) FROM {schema}.likes""",
        )
    )


def empty(fleet, cluster, shard):
    schema = f"insta{shard}"
    sql(
        fleet,
        cluster,
        f"""
        DELETE FROM {schema}.likes WHERE photo_id < 0;
        DELETE FROM {schema}.likes USING {schema}.photos
              WHERE likes.photo_id = photos.id AND photos.caption = %s;
        DELETE FROM {schema}.photos WHERE caption = %s;
        DELETE FROM {schema}.users WHERE username LIKE 'igops\\_bench\\_%%';""",
        (CAPTION, CAPTION),
    )
    # FULL: the space goes back, and the lab's shard sizes (which `shard rebalance` plans by) with
    # it. The standby's hot_standby_feedback can keep the deleted rows visible for a moment, and
    # a VACUUM FULL then copies them: again until the tables hold only the lab's own few rows.
    for _ in range(20):
        sql(fleet, cluster, f"VACUUM FULL {schema}.likes, {schema}.photos, {schema}.users")
        size = sql(
            fleet,
            cluster,
            f"SELECT pg_total_relation_size('{schema}.likes') + pg_total_relation_size('{schema}.photos') "
            f"+ pg_total_relation_size('{schema}.users')",
        )[0][0]
        if size < 16 << 20:
            return
        time.sleep(0.5)
    raise SystemExit(f"{cluster}/{schema} still holds {size >> 20} MiB after emptying it")


def count_everything(fleet, source, target, shard):
    """Seconds to count every row of the shard on both copies at once: the check the cut-over
    used to run with writes held."""
    tables = ("users", "photos", "likes", "following", "followers")
    started = time.monotonic()

    def count(cluster):
        return sql(fleet, cluster, " UNION ALL ".join(f"SELECT count(*) FROM insta{shard}.{table}" for table in tables))

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(count, (source, target)))
    return time.monotonic() - started


def checkpoint(fleet):
    """Recycle WAL between phases: the lab's WAL volumes are small."""
    for cluster in fleet.model.postgres.clusters:
        sql(fleet, cluster, "CHECKPOINT")


class Probe:
    """An app worker writing into the shard every 10 ms; the longest wait for an
    acknowledgement inside a window is how long the shard's writes were blocked."""

    def __init__(self, shard):
        from app.config import load_config
        from app.db import PgConnections
        from app.directory import Directory

        config = load_config(state.paths().app_root("app1") / "shared" / "app.toml")
        self.pg = PgConnections(config.postgres)
        self.directory = Directory(self.pg, config.postgres.directory_database)
        self.shard = shard
        self.acks: list[float] = []
        self.failures = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def before_retry(self, exc) -> bool:
        previous = self.directory.cached
        return self.directory.refresh().shard_map is not (previous.shard_map if previous else None)

    def run(self):
        number = 0
        while not self.stop.is_set():
            number += 1

            def insert(cursor, number=number):
                cursor.execute(
                    f"INSERT INTO insta{self.shard}.likes (photo_id, user_id) VALUES (%s, 0) ON CONFLICT DO NOTHING",
                    (-number,),
                )

            try:
                self.pg.run(
                    lambda: self.directory.snapshot().shard_map.database_for(self.shard),
                    insert,
                    before_retry=self.before_retry,
                )
                self.acks.append(time.monotonic())
            except Exception:  # noqa: BLE001 - a write the app would have failed: counted, not fatal
                self.failures += 1
            time.sleep(0.01)

    def longest_wait(self, start, end):
        inside = [start] + [ack for ack in self.acks if start <= ack <= end] + [end]
        return max(later - earlier for earlier, later in zip(inside, inside[1:], strict=False))

    def close(self):
        self.stop.set()
        self.thread.join(30)
        self.pg.close()


def pipe(fleet, shard, source, target):
    """The offline move: lock the shard's tables, dump the schema into the target, release."""
    schema = f"insta{shard}"
    password = Secrets(fleet.model.secrets.file).get("postgres_password")
    environment = {**os.environ, "PGPASSWORD": password, "PGUSER": fleet.model.postgres.user}
    src, dst = primary_of(fleet, source), primary_of(fleet, target)
    locker = connect(fleet, source, fleet.model.postgres.database, purpose="bench")
    try:
        with locker.cursor() as cursor:
            started = time.monotonic()
            cursor.execute(
                f"LOCK TABLE {schema}.users, {schema}.photos, {schema}.likes, {schema}.following, "
                f"{schema}.followers IN EXCLUSIVE MODE"
            )
            dump = subprocess.Popen(
                [BIN / "pg_dump", "-h", str(src.address), "-d", fleet.model.postgres.database, "-n", schema],
                stdout=subprocess.PIPE,
                env=environment,
            )
            load = subprocess.run(
                [
                    BIN / "psql",
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    str(dst.address),
                    "-d",
                    fleet.model.postgres.database,
                ],
                stdin=dump.stdout,
                env=environment,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            dump.stdout.close()
            if dump.wait() != 0 or load.returncode != 0:
                raise SystemExit(f"pg_dump | psql failed: {load.stderr[-500:]}")
            finished = time.monotonic()
        locker.rollback()
    finally:
        locker.close()
    sql(fleet, target, f"DROP SCHEMA {schema} CASCADE")
    return started, finished


def igops_move(fleet, shard, target):
    # This checkout's igops, whichever is installed.
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "igops",
            "-c",
            str(fleet.source),
            "shard",
            "move",
            str(shard),
            "--to",
            target,
            "--yes",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    finished = time.monotonic()
    envelope = json.loads(done.stdout)
    if not envelope["ok"]:
        raise SystemExit(f"igops shard move failed: {envelope['error']}")
    return started, finished, envelope["data"], envelope["steps"]


def hold_lab_lock():
    """The lab's test lock, asked for every two seconds: the file is open only while held."""
    while True:
        handle = open(LAB_LOCK, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            handle.close()
            time.sleep(2)


def main():
    # The probe runs the app's retry code, which logs every retry: the counts are what matter here.
    logging.getLogger("app").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard", type=int, default=13)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with hold_lab_lock():
        fleet = inventory.load_file(state.paths().inventory)
        shard = args.shard
        home = shards.read_map(fleet, sizes=False).placement()[shard]
        away = next(name for name in fleet.model.postgres.clusters if name != home)
        empty(fleet, home, shard)
        rows = fill(fleet, home, shard, args.rows)
        checkpoint(fleet)
        size = shards.read_map(fleet).sizes()[shard]
        probe = Probe(shard)
        try:
            time.sleep(1)
            pipe_start, pipe_end = pipe(fleet, shard, home, away)
            pipe_blocked = probe.longest_wait(pipe_start, pipe_end + 0.5)
            checkpoint(fleet)
            samples = []
            for source, target in ((home, away), (away, home)):
                started, finished, result, steps = igops_move(fleet, shard, target)
                samples.append(
                    (
                        f"igops {source} -> {target}",
                        finished - started,
                        result,
                        probe.longest_wait(started, finished),
                        steps,
                    )
                )
                checkpoint(fleet)
            # The cut-over counted the two copies at once, one per cluster: two sessions here.
            counted = count_everything(fleet, home, home, shard)
        finally:
            probe.close()
            empty(fleet, shards.read_map(fleet, sizes=False).placement()[shard], shard)
            checkpoint(fleet)
        pipe_total = pipe_end - pipe_start
        print(
            f"shard_move: shard {shard}, {rows:,} rows, {human_bytes(size)} with indexes; "
            f"probe writes {len(probe.acks)} ok, {probe.failures} failed"
        )
        print(f"{'method':<22} {'total s':>8} {'x pipe':>7} {'blocked ms (journal)':>21} {'longest write wait ms':>22}")
        print(
            f"{'pg_dump | psql':<22} {pipe_total:>8.2f} {1:>7.2f} {pipe_total * 1000:>21.0f} "
            f"{pipe_blocked * 1000:>22.0f}"
        )
        for name, total, result, waited, _ in samples:
            print(
                f"{name:<22} {total:>8.2f} {total / pipe_total:>7.2f} {result['write_block_ms']:>21.0f} "
                f"{waited * 1000:>22.0f}"
            )
        for name, total, _, _, steps in samples:
            timed = sum(step["duration_ms"] for step in steps) / 1000
            print(
                f"{name}: "
                + ", ".join(
                    f"{step['title'].split(':')[0].split(' (')[0][:28]} {step['duration_ms'] / 1000:.2f}"
                    for step in steps
                )
                + f"; start-up and confirmation {total - timed:.2f} s"
            )
        for name, _, _, _, steps in samples:
            cut_over = next(step for step in steps if step["title"].startswith("cut over"))
            print(f"{name} cut-over: {cut_over['detail']}")
        print(
            f"counting every row of both copies (the former check with writes held): {counted:.2f} s; "
            f"at 10,000,000 rows about {counted * 10_000_000 / rows:.0f} s (statement timeout 30 s)"
        )
        worst = max(result["write_block_ms"] for _, _, result, _, _ in samples)
        slowest = max(total for _, total, _, _, _ in samples) / pipe_total
        print(
            f"goals: writes blocked <= 50 ms: {'met' if worst <= 50 else 'MISSED'} ({worst:.0f} ms); "
            f"total <= 1.0x pipe: {'met' if slowest <= 1.0 else 'MISSED'} ({slowest:.2f}x)"
        )


if __name__ == "__main__":
    main()
