"""Point-in-time restore of the same cluster and data, igops against a pgBackRest full restore.

- igops: `igops snapshot restore GROUP --to T --onto db2`: volumes from a snapshot group (the
  lab's EBS: reflink copies of the volume images), then only the WAL archived since the group is
  replayed. Twice: from a group taken with the full backup (the same base age: both copies
  replay the same WAL), and from a group taken after the minute of writes, as the newest of
  groups taken every few hours would be (what `igops snapshot restore pg2 --to T` chooses).
- pgBackRest: `pgbackrest restore --type=time --target=T` from a full backup of the same cluster
  taken just after the first group, into a directory on db2, then the same server start and wait.

The data: a pgbench database of SCALE (about 1.1 GB) and half a gigabyte of random bytes on
cluster pg2, then a minute of pgbench writes at 100 transactions a second after both base
backups, then the target T. The page cache is dropped before each copy starts. Both copies start the same way (igops'
restored-server start: a socket of its own, archiving off, promote at the target). Reported per
method: wall time until the copy has promoted, time until the first query answers, and bytes read:
- igops: what replay and start-up read from the restored volumes (the loop devices' read
  sectors; on EBS, the blocks a lazily loaded volume fetches) and the WAL segments fetched;
- pgBackRest: the backup's bytes in the repository (all read by the restore) and the WAL
  segments fetched.
Goal: igops at least 3x faster than the full restore.

Needs the lab with volumes of at least 4 GB (`IGOPS_LAB_VOLUME_SIZE=4G igops lab up`; it grows
the volumes in place) and holds the lab's test lock. Leaves the pgBackRest backup in the lab's
repository and drops the bench database.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from igops import inventory  # noqa: E402
from igops.lab import aws, state  # noqa: E402
from igops.pg import archive  # noqa: E402
from igops.restore_scripts import PostgresStart, start_script  # noqa: E402
from igops.secrets import Secrets  # noqa: E402

LOCK = Path(os.environ.get("IGOPS_LAB_TEST_LOCK", "/tmp/igops-lab-tests.lock"))
IGOPS = [sys.executable, "-m", "igops"]
CLUSTER, PRIMARY, STANDBY, SCRATCH = "pg2", "db3", "db4", "db2"
DATABASE = "restorebench"
SCALE = int(os.environ.get("BENCH_RESTORE_SCALE", "70"))  # pgbench: 15 MB a unit, about 1.1 GB
IGOPS_PORT, BASELINE_PORT = 5495, 5494
NEEDED_BYTES = 4 << 30
SEGMENT = 16 << 20
FIRST_QUERY = "SELECT abalance FROM pgbench_accounts WHERE aid = 1"
PAYLOAD_ROWS = int(os.environ.get("BENCH_RESTORE_PAYLOAD_ROWS", "500000"))  # about 0.5 GB of random bytes
PAYLOAD_SQL = (
    "CREATE EXTENSION IF NOT EXISTS pgcrypto; "
    "CREATE TABLE payload AS SELECT g AS id, gen_random_bytes(1000) AS body "
    f"FROM generate_series(1, {PAYLOAD_ROWS}) g"
)
# The writes after both base backups: a steady rate, as a cluster between two groups sees.
WORKLOAD = ["-n", "-T", "60", "-R", "100", "-c", "4", "-j", "2"]


@dataclass
class Outcome:
    method: str
    promoted_s: float
    first_query_s: float
    read_bytes: int
    wal_segments: int
    detail: str


def sh(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise SystemExit(f"`{shlex.join(argv)[:300]}` failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done


def igops_envelope(fleet, *args: str, timeout: float = 1800) -> dict:
    done = subprocess.run(
        [*IGOPS, "-c", str(fleet.source), *args, "--json"], capture_output=True, text=True, timeout=timeout
    )
    envelope = json.loads(done.stdout) if done.stdout.strip() else {}
    if done.returncode:
        raise SystemExit(f"igops {' '.join(args)} failed: {(envelope.get('error') or done.stderr)}")
    return envelope


def igops(fleet, *args: str, timeout: float = 1800) -> dict:
    return igops_envelope(fleet, *args, timeout=timeout)["data"]


def phases(steps: list[dict]) -> str:
    """Where a restore's time went, from its numbered steps: the volumes made and attached,
    everything on the host before the server starts, the start, and the replay to the target."""
    spent: dict[str, float] = {}
    for step in steps:
        title = step["title"]
        phase = (
            "volumes"
            if title.startswith("volume from")
            else "start"
            if title.startswith("start Postgres")
            else "replay"
            if title.startswith("replay to")
            else "host"
        )
        spent[phase] = spent.get(phase, 0.0) + step["duration_ms"] / 1000
    return ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in spent.items())


def as_postgres(fleet, *argv: str, stdin: str | None = None) -> str:
    env = {**os.environ, "PGPASSWORD": Secrets(fleet.model.secrets.file).get("postgres_password") or ""}
    return sh(["runuser", "-u", fleet.model.postgres.os_user, "--", *argv], input=stdin, env=env).stdout


def client(fleet, tool: str, host: str, database: str, *args: str, stdin: str | None = None) -> str:
    pg = fleet.model.postgres
    return as_postgres(
        fleet,
        f"{pg.bin_dir.rstrip('/')}/{tool}",
        "-h",
        str(fleet.host(host).address),
        "-p",
        str(pg.port),
        "-U",
        pg.user,
        *args,
        database,
        stdin=stdin,
    )


def check_room(fleet) -> None:
    for name in (PRIMARY, STANDBY, SCRATCH):
        for mount in fleet.host(name).mounts:
            if shutil.disk_usage(mount.path).total < NEEDED_BYTES * 0.95:
                raise SystemExit(
                    f"{name}:{mount.path} is smaller than {NEEDED_BYTES >> 30} GB: "
                    "run `IGOPS_LAB_VOLUME_SIZE=4G igops lab up` first (it grows the lab's volumes in place)"
                )


def load_data(fleet) -> None:
    client(fleet, "psql", PRIMARY, "postgres", "-XAtq", "-c", f"DROP DATABASE IF EXISTS {DATABASE}")
    client(fleet, "psql", PRIMARY, "postgres", "-XAtq", "-c", f"CREATE DATABASE {DATABASE}")
    started = time.monotonic()
    client(fleet, "pgbench", PRIMARY, DATABASE, "-i", "-q", "-s", str(SCALE))
    # pgbench's rows are mostly blank filler, which compresses tenfold: random bytes beside them
    # give the full backup a size of the kind production data has.
    client(fleet, "psql", PRIMARY, DATABASE, "-XAtq", "-c", PAYLOAD_SQL)
    size = client(fleet, "psql", PRIMARY, DATABASE, "-XAtq", "-c", "SELECT pg_database_size(current_database())")
    print(f"loaded {int(size) / 1e9:.2f} GB in {time.monotonic() - started:.0f} s", file=sys.stderr)


def wait_for_standby(fleet) -> None:
    lag = "SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)), 0) FROM pg_stat_replication"
    deadline = time.monotonic() + 600
    while int(float(client(fleet, "psql", PRIMARY, "postgres", "-XAtq", "-c", lag).strip() or 0)) > 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"{STANDBY} did not catch up")
        time.sleep(1)


def switch_and_archive(fleet) -> None:
    segment = client(
        fleet, "psql", PRIMARY, "postgres", "-XAtq", "-c", "SELECT pg_walfile_name(pg_current_wal_lsn())"
    ).strip()
    client(fleet, "psql", PRIMARY, "postgres", "-XAtq", "-c", "SELECT pg_switch_wal()")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        last = igops(fleet, "pg", "archive", "status", CLUSTER)["status"]["archiver"]["last_archived_wal"]
        if last and last[8:] >= segment[8:]:
            return
        time.sleep(1)
    raise SystemExit(f"{segment} was not archived within 300 s")


def pgbackrest_backup(fleet) -> dict:
    config = archive.member_paths(fleet, fleet.host(PRIMARY))["config_file"]
    started = time.monotonic()
    as_postgres(
        fleet,
        "pgbackrest",
        f"--config={config}",
        f"--stanza={archive.stanza(fleet, CLUSTER)}",
        "--type=full",
        "--compress-type=lz4",
        "--process-max=2",
        "--start-fast",
        "backup",
    )
    info = json.loads(
        as_postgres(
            fleet,
            "pgbackrest",
            f"--config={config}",
            f"--stanza={archive.stanza(fleet, CLUSTER)}",
            "--output=json",
            "info",
        )
    )
    backup = info[0]["backup"][-1]
    print(f"pgBackRest full backup {backup['label']} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return backup


def first_query(psql: str, started: float) -> float:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = subprocess.run(
            [*shlex.split(psql.replace(" -d postgres", f" -d {DATABASE}")), "-XAtqc", FIRST_QUERY],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            return time.monotonic() - started
        time.sleep(0.05)
    raise SystemExit(f"the copy never answered: {done.stderr.strip()[-300:]}")


def wait_promoted(psql: str, started: float) -> float:
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        done = subprocess.run(
            [*shlex.split(psql), "-XAtqc", "SELECT pg_is_in_recovery()"], capture_output=True, text=True
        )
        if done.stdout.strip() == "f":
            return time.monotonic() - started
        time.sleep(0.1)
    raise SystemExit("the pgBackRest copy never promoted")


def fetched_segments(log_directory: str) -> int:
    """WAL segments restore_command fetched, by the restored server's own log lines (Postgres
    logs each at LOG level; pgBackRest's archive-get logs nothing to a file at its default
    levels). History files and a segment fetched twice count once."""
    found: set[str] = set()
    for log in Path(log_directory).glob("*.log"):
        found.update(re.findall(r'restored log file "([0-9A-F]{24})" from archive', log.read_text(errors="replace")))
    return len(found)


def loop_reads() -> dict[str, int]:
    """Bytes read so far by every loop device. The kernel keeps a loop device's counters across
    detach and attach: a restore's volumes may come up on devices read before."""
    return {stat.parent.name: int(stat.read_text().split()[2]) * 512 for stat in Path("/sys/block").glob("loop*/stat")}


def loop_read_bytes(paths: list[str], before: dict[str, int]) -> int:
    total = 0
    now = loop_reads()
    for path in paths:
        device = Path(sh(["findmnt", "-n", "-o", "SOURCE", path]).stdout.strip()).name
        total += now[device] - before.get(device, 0)
    return total


def drop_caches() -> None:
    sh(["sync"])
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_igops(fleet, target: str, group: str, method: str) -> Outcome:
    drop_caches()
    reads = loop_reads()
    started = time.monotonic()
    envelope = igops_envelope(
        fleet, "snapshot", "restore", group, "--to", target, "--onto", SCRATCH, "--port", str(IGOPS_PORT), "--yes"
    )
    promoted = time.monotonic() - started
    data = envelope["data"]
    psql = data["postgres"]["psql"]
    answered = first_query(psql, started)
    read = loop_read_bytes(list(data["mounted"].values()), reads)
    segments = fetched_segments(data["postgres"]["socket_directory"])
    igops(fleet, "snapshot", "restore", data["group_id"], "--onto", SCRATCH, "--cleanup", "--yes")
    return Outcome(
        method,
        promoted,
        answered,
        read,
        segments,
        f"group {data['group_id']}; {phases(envelope['steps'])}",
    )


def run_pgbackrest(fleet, target: str, backup: dict) -> Outcome:
    pg = fleet.model.postgres
    scratch = fleet.host(SCRATCH)
    base = Path(scratch.mounts[0].path) / "bench-pgbackrest"
    shutil.rmtree(base, ignore_errors=True)
    data, run = base / "data", base / "run"
    for path in (data, run):
        path.mkdir(parents=True)
    shutil.chown(base, pg.os_user)
    shutil.chown(data, pg.os_user)
    shutil.chown(run, pg.os_user)
    data.chmod(0o700)
    config = run / "pgbackrest.conf"
    config.write_text(archive.render_restore_config(fleet, CLUSTER, str(data), str(run), BASELINE_PORT))
    config.chmod(0o600)
    shutil.chown(config, pg.os_user)
    server = PostgresStart(str(data), {}, str(run), BASELINE_PORT, pg.bin_dir.rstrip("/"), pg.os_user)
    # The source's pg_wal is a link to its WAL volume: restored as is, it would point the copy at
    # the source's own WAL directory. It goes beside the copy instead.
    source_wal = Path(fleet.path_for(pg.data_directory, fleet.host(PRIMARY))) / "pg_wal"
    links = [f"--link-map=pg_wal={base / 'wal'}"] if source_wal.is_symlink() else []
    started = time.monotonic()
    try:
        as_postgres(
            fleet,
            "pgbackrest",
            f"--config={config}",
            f"--stanza={archive.stanza(fleet, CLUSTER)}",
            "--type=time",
            f"--target={target}",
            "--target-action=promote",
            "--process-max=2",
            # Spelled out: archive-get must read this config, not the default path.
            f"--recovery-option=restore_command=pgbackrest --config={config} "
            f'--stanza={archive.stanza(fleet, CLUSTER)} archive-get %f "%p"',
            *links,
            "restore",
        )
        restored = time.monotonic() - started
        # What the restore wrote is still in the page cache; a copy of a database bigger than
        # memory starts cold, as igops' copy does (its volumes are fresh loop devices).
        drop_caches()
        sh(["bash", "-c", start_script(server)])
        # A hot standby answers once consistent, before it reaches the target and promotes.
        answered = first_query(server.psql, started)
        promoted = wait_promoted(server.psql, started)
        segments = fetched_segments(str(run))
        size = backup["info"]["repository"]["delta"]
        return Outcome(
            "pgbackrest restore --type=time", promoted, answered, size, segments, f"restore alone {restored:.1f} s"
        )
    finally:
        subprocess.run(
            ["runuser", "-u", pg.os_user, "--", f"{server.bin_dir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    os.environ.update(aws.AWS_ENV)
    fleet = inventory.load_file(state.paths().inventory)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        check_room(fleet)
        load_data(fleet)
        wait_for_standby(fleet)
        switch_and_archive(fleet)
        groups = [igops(fleet, "snapshot", "create", STANDBY, "--no-hook", "--yes")["group_id"]]
        try:
            backup = pgbackrest_backup(fleet)
            client(fleet, "pgbench", PRIMARY, DATABASE, *WORKLOAD)
            groups.append(igops(fleet, "snapshot", "create", STANDBY, "--no-hook", "--yes")["group_id"])
            target = client(fleet, "psql", PRIMARY, "postgres", "-XAtq", "-c", "SELECT clock_timestamp()").strip()
            time.sleep(1)
            client(fleet, "pgbench", PRIMARY, DATABASE, "-n", "-T", "5", "-c", "2")
            switch_and_archive(fleet)
            outcomes = [
                run_igops(fleet, target, groups[0], "igops, group of the backup's age"),
                run_igops(fleet, target, groups[1], "igops, group after the writes"),
                run_pgbackrest(fleet, target, backup),
            ]
        finally:
            for group in groups:
                igops(fleet, "snapshot", "delete", group, "--accept-risk", "--yes")
            client(fleet, "psql", PRIMARY, "postgres", "-XAtq", "-c", f"DROP DATABASE IF EXISTS {DATABASE}")
    report(outcomes, backup)


def report(outcomes: list[Outcome], backup: dict) -> None:
    *ours, theirs = outcomes
    print(f"restore of {CLUSTER} to a point in time; pgBackRest backup {backup['label']}")
    print(f"{'method':34} {'promoted':>9} {'1st query':>10} {'read':>10} {'WAL segs':>9}  detail")
    for outcome in outcomes:
        print(
            f"{outcome.method:34} {outcome.promoted_s:8.1f}s {outcome.first_query_s:9.1f}s "
            f"{outcome.read_bytes / 2**20:8.0f}MiB {outcome.wal_segments:9d}  {outcome.detail}"
        )
    for outcome in ours:
        ratio = theirs.promoted_s / outcome.promoted_s
        print(
            f"pgBackRest / {outcome.method}: promoted {ratio:.1f}x, "
            f"first query {theirs.first_query_s / outcome.first_query_s:.1f}x, "
            f"bytes read {theirs.read_bytes / max(outcome.read_bytes, 1):.1f}x; goal at least 3x faster: "
            + ("met" if ratio >= 3 else "MISSED")
        )
    print(json.dumps({"outcomes": [outcome.__dict__ for outcome in outcomes]}))


if __name__ == "__main__":
    main()
