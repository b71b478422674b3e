"""Snapshots in the lab, with the faults the runbook fears: igops killed while the filesystems
are frozen, the API failing mid-group, a restore drill under write load, and two creates at once.
Real XFS on loop devices, real Postgres, moto behind a fault-injecting proxy."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from igops import snapshot_groups
from igops.ebs import Ebs, tags_of
from igops.errors import ExitCode
from igops.lab.faults import AwsProxy, Faults
from igops.secrets import Secrets
from tests.conftest import IGOPS, ROOT, run_igops
from tests.labtools import wait_for

pytestmark = pytest.mark.lab

PROXY_ADDRESS = "127.0.10.9"
DRILL_PORT = 5499


def roles_of_main(fleet) -> dict[str, bool]:
    """member -> whether it is in recovery, asked of each server: tests elsewhere switch the
    cluster over, so the inventory's names do not say which member is the primary now."""
    cluster = fleet.model.postgres.clusters["main"]
    roles = {}
    for name in [cluster.primary, *cluster.standbys]:
        connection = postgres(fleet, name)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_is_in_recovery()")
            roles[name] = cursor.fetchone()[0]
        connection.close()
    return roles


def primary_of_main(fleet) -> str:
    """The member that accepts writes now."""
    [primary] = [name for name, in_recovery in roles_of_main(fleet).items() if not in_recovery]
    return primary


def standby_of_main(fleet) -> str:
    """The member to snapshot: a standby (igops refuses to freeze the live primary)."""
    return next(name for name, in_recovery in roles_of_main(fleet).items() if in_recovery)


def postgres(fleet, host_name=None):
    import psycopg2

    host_name = host_name or primary_of_main(fleet)
    connection = psycopg2.connect(
        host=str(fleet.host(host_name).address),
        port=fleet.model.postgres.port,
        user=fleet.model.postgres.user,
        dbname="postgres",
        connect_timeout=5,
        password=Secrets(fleet.model.secrets.file).get("postgres_password"),
    )
    connection.autocommit = True
    return connection


@contextmanager
def proxied_inventory(fleet, tmp_path, faults: Faults):
    """Yields the path of a copy of the inventory whose AWS calls go through a proxy injecting
    `faults`; the proxy serves for as long as the block runs."""
    with AwsProxy((PROXY_ADDRESS, 0), fleet.model.aws.endpoint_url, faults) as proxy:
        text = fleet.source.read_text()
        text = re.sub(r"(?m)^endpoint_url = .*$", f'endpoint_url = "{proxy.url}"', text)
        path = tmp_path / "igops.toml"
        path.write_text(text)
        yield path


def create_arguments(config: Path, host: str, *options: str) -> list[str]:
    """igops arguments for `snapshot create HOST` through `config`, confirmed and without the
    pre-freeze hook, followed by `options`."""
    return ["-c", str(config), "snapshot", "create", host, "--yes", "--no-hook", *options]


def run_create(config: Path, host: str, *options: str) -> subprocess.CompletedProcess:
    """The create of create_arguments, run to its end."""
    return run_igops(*create_arguments(config, host, *options))


def start_create(config: Path, host: str, *options: str, stdout, stderr, text: bool = False) -> subprocess.Popen:
    """The create of create_arguments, started in the background (with the command and folder
    run_igops uses) for a test that acts while it runs. Each caller says what becomes of the
    create's output: some tests read it, some discard it."""
    return subprocess.Popen(
        [*IGOPS, *create_arguments(config, host, *options)], stdout=stdout, stderr=stderr, text=text, cwd=ROOT
    )


def can_write(mount: str, timeout: float) -> bool:
    """Whether a write to the filesystem completes within `timeout` (it hangs while frozen)."""
    probe = subprocess.Popen(
        ["sh", "-c", f"echo probe > {mount}/.igops-write-probe && sync -f {mount}/.igops-write-probe"]
    )
    try:
        probe.wait(timeout)
        return probe.returncode == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        if probe.poll() is None:
            # Cannot be killed while it sleeps on the frozen fs; it finishes once thawed.
            threading.Thread(target=probe.wait, daemon=True).start()


def freeze_processes():
    """(pid, session id) of every host-side freeze program."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"igops-freeze" in (proc / "cmdline").read_bytes():
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                found.append((int(proc.name), int(stat[3])))
        except OSError:
            continue
    return found


def group_snapshots(fleet, group_id):
    return Ebs(fleet).snapshots({"igops:group": group_id})


def test_sigkill_while_frozen_thaws_by_the_deadline_and_writes_resume(lab, tmp_path):
    data_mount = lab.host(standby_of_main(lab)).mounts[0].path
    faults = Faults(hold={"CreateSnapshots": 60})
    with proxied_inventory(lab, tmp_path, faults) as config:
        igops = start_create(
            config, standby_of_main(lab), "--deadline", "4", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert wait_for(lambda: "CreateSnapshots" in faults.calls, 30), igops.stderr.read() if igops.poll() else ""
        assert not can_write(data_mount, 0.5), "the data mount should be frozen now"
        # The worst case: the freezing process hangs (stopped) AND igops dies. Only the watchdog is left.
        holders = [pid for pid, session in freeze_processes() if pid != session]
        assert holders
        for pid in holders:
            os.kill(pid, signal.SIGSTOP)
        killed_at = time.monotonic()
        igops.kill()
        igops.wait()
        try:
            assert wait_for(lambda: can_write(data_mount, 0.2), 8)
            thawed_after = time.monotonic() - killed_at
        finally:
            for pid in holders:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
    # The held call must not reach EC2 when it wakes: its snapshots would be a group nobody tags.
    faults.fail["CreateSnapshots"] = 503
    assert thawed_after < 4 + 1.5, f"thawed {thawed_after:.1f} s after the kill; deadline was 4 s"
    with postgres(lab).cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS snapshot_kill_probe (at timestamptz)")
        cursor.execute("INSERT INTO snapshot_kill_probe VALUES (now())")


def test_sigkill_of_igops_alone_thaws_at_once(lab, tmp_path):
    data_mount = lab.host(standby_of_main(lab)).mounts[0].path
    faults = Faults(hold={"CreateSnapshots": 60})
    with proxied_inventory(lab, tmp_path, faults) as config:
        igops = start_create(
            config, standby_of_main(lab), "--deadline", "30", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert wait_for(lambda: "CreateSnapshots" in faults.calls, 30)
        killed_at = time.monotonic()
        igops.kill()
        igops.wait()
        assert wait_for(lambda: can_write(data_mount, 0.2), 10)
    faults.fail["CreateSnapshots"] = 503  # the held call must not make snapshots when it wakes
    # The SSH session dropped with igops, so the freezer saw EOF: far sooner than the 30 s deadline.
    assert time.monotonic() - killed_at < 5
    assert wait_for(lambda: not freeze_processes(), 5)


def test_api_failing_mid_group_thaws_at_once_and_marks_the_group_failed(lab, tmp_path):

    ec2 = Ebs(lab)._ec2
    standby = lab.host(standby_of_main(lab))
    wal = next(m for m in standby.mounts if m.purpose == "wal")
    wal_volume = next(a.volume_id for a in Ebs(lab).instance_volumes(standby.instance_id) if a.device == wal.device)
    # A spare volume on the instance means the mounts are not all of its data volumes: igops
    # then makes one CreateSnapshot call per volume, in parallel, and one of them will fail.
    spare = ec2.create_volume(Size=1, AvailabilityZone=Ebs(lab).availability_zone(standby.instance_id))["VolumeId"]
    ec2.attach_volume(VolumeId=spare, InstanceId=standby.instance_id, Device="/dev/sdz")
    try:
        faults = Faults(fail={"CreateSnapshot": 400}, fail_when={"CreateSnapshot": wal_volume})
        with proxied_inventory(lab, tmp_path, faults) as config:
            result = run_create(config, standby_of_main(lab), "--json")
        assert result.returncode == ExitCode.FAILED, result.stderr
        envelope = json.loads(result.stdout)
        assert envelope["ok"] is False and "InjectedFault" in envelope["error"]["message"]
        assert faults.calls.count("CreateSnapshot") == 2
        group_id = re.search(r"group (\S+) failed", envelope["error"]["message"]).group(1)
        assert group_snapshots(lab, group_id) == []  # the one that was made is deleted
        thaw_step = next(step for step in envelope["steps"] if step["title"].startswith("thaw"))
        assert thaw_step["status"] == "ok"
        assert all(can_write(mount.path, 2) for mount in standby.mounts)
    finally:
        ec2.detach_volume(VolumeId=spare, InstanceId=standby.instance_id, Device="/dev/sdz", Force=True)
        ec2.delete_volume(VolumeId=spare)


def test_a_create_whose_answer_was_lost_keeps_a_complete_group_and_deletes_the_strays(lab, tmp_path):
    """EC2 makes the snapshots, the answer is lost, the SDK asks again and EC2 makes them again:
    the group is complete with one snapshot per volume, and the first call's snapshots (strays
    carrying the group's tag) are deleted, not counted (they once made the group failed, and
    prune then deleted a good group)."""
    standby = standby_of_main(lab)
    faults = Faults(lose_answer={"CreateSnapshots": 1})
    with proxied_inventory(lab, tmp_path, faults) as config:
        result = run_create(config, standby, "--json")
    assert result.returncode == 0, result.stderr
    assert faults.calls.count("CreateSnapshots") == 2
    envelope = json.loads(result.stdout)
    group_id = envelope["data"]["group_id"]
    tagged = next(step for step in envelope["steps"] if step["title"].startswith("tag "))
    assert tagged["status"] == "ok" and tagged["detail"].startswith("deleted "), tagged
    strays = re.findall(r"snap-\w+", tagged["detail"])
    assert len(strays) == len(group_snapshots(lab, group_id)), tagged
    [group] = snapshot_groups.groups(Ebs(lab), group_id=group_id)
    assert group.state in (snapshot_groups.STATE_COMPLETE, snapshot_groups.STATE_PENDING), group
    assert group.volumes == group.expected and not group.strays
    assert {s["SnapshotId"] for s in group_snapshots(lab, group_id)} == snapshot_groups.snapshot_ids(group)
    assert {s["SnapshotId"] for s in group_snapshots(lab, group_id)}.isdisjoint(strays)


@pytest.mark.parametrize("watchdog", ["running", "gone"])
def test_calls_outlasting_the_freeze_deadline_fail_the_group_and_delete_its_snapshots(lab, tmp_path, watchdog):
    standby = lab.host(standby_of_main(lab))
    # The 2 s deadline passes while CreateSnapshots is still held: the freezer and its watchdog
    # both thaw then, and the snapshots made after that cannot be trusted. A watchdog gone
    # before the freezer tells it the thaw is done must not stop the freezer reporting it.
    faults = Faults(hold={"CreateSnapshots": 4})
    with proxied_inventory(lab, tmp_path, faults) as config:
        igops = start_create(
            config, standby.name, "--deadline", "2", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if watchdog == "gone":
            assert wait_for(lambda: "CreateSnapshots" in faults.calls, 30)
            # The watchdog leads its own session; so does the login shell that started the freezer.
            watchdogs = [
                pid
                for pid, session in freeze_processes()
                if pid == session and Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"python3")
            ]
            assert watchdogs
            for pid in watchdogs:
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = igops.communicate(timeout=60)
    assert igops.returncode == ExitCode.FAILED, stdout + stderr
    envelope = json.loads(stdout)
    assert "deadline passed before the snapshot calls returned" in envelope["error"]["message"]
    group_id = re.search(r"group (\S+) failed", envelope["error"]["message"]).group(1)
    assert "CreateSnapshots" in faults.calls
    assert group_snapshots(lab, group_id) == []
    listed = json.loads(
        run_igops("snapshot", "list", "--host", standby.name, "--json", env={"IGOPS_CONFIG": str(lab.source)}).stdout
    )["data"]["groups"]
    assert group_id not in [group["group_id"] for group in listed]
    assert all(can_write(mount.path, 2) for mount in standby.mounts)


def test_endpoint_down_during_the_call(lab, tmp_path):
    faults = Faults(fail={"CreateSnapshots": 503})
    with proxied_inventory(lab, tmp_path, faults) as config:
        result = run_create(config, standby_of_main(lab), "--json")
    assert result.returncode == ExitCode.FAILED
    assert "CreateSnapshots" in json.loads(result.stdout)["error"]["message"]
    assert all(can_write(mount.path, 2) for mount in lab.host(standby_of_main(lab)).mounts)


def test_two_creates_on_one_host(lab, tmp_path):
    # The first holds its lock while its call is held: long enough for the second to start,
    # plan (SSH discovery, EC2 and Postgres look-ups) and meet the lock; its deadline outlasts the hold.
    standby = standby_of_main(lab)
    faults = Faults(hold={"CreateSnapshots": 8})
    with proxied_inventory(lab, tmp_path, faults) as config:
        first = start_create(
            config, standby, "--deadline", "30", "--json", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert wait_for(lambda: "CreateSnapshots" in faults.calls, 30)
        second = run_create(config, standby)
        assert first.poll() is None, "the second create must have run while the first held its lock"
        output, _ = first.communicate(timeout=60)
    assert second.returncode == ExitCode.LOCKED
    assert "is held by snapshot-create" in second.stderr, second.stderr
    assert first.returncode == 0 and json.loads(output)["data"]["state"] == "complete"


def lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def group_volumes(lab, group_id):
    return Ebs(lab)._ec2.describe_volumes(Filters=[{"Name": "tag:igops:group", "Values": [group_id]}])["Volumes"]


def restore_traces(lab, group_id):
    """The group's volumes, and the lab's restored images and loop devices over them."""
    store = Path(lab.model.aws.volume_images) / "restored"
    loops = subprocess.run(["losetup", "-n", "-O", "NAME,BACK-FILE", "-l"], capture_output=True, text=True).stdout
    return {
        "volumes": [volume["VolumeId"] for volume in group_volumes(lab, group_id)],
        "images": sorted(str(path) for path in store.glob("*.img")),
        "loops": sorted(line.split()[0] for line in loops.splitlines() if str(store) in line),
    }


def restored_mounts(group_id):
    return [line for line in Path("/proc/self/mounts").read_text().splitlines() if group_id in line]


def test_snapshot_under_write_load_restores_every_acknowledged_transaction(lab, tmp_path):
    env = {"IGOPS_CONFIG": str(lab.source)}
    standby = standby_of_main(lab)
    connection = postgres(lab)
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS snapshot_drill")
        cursor.execute("CREATE TABLE snapshot_drill (id bigint PRIMARY KEY, at timestamptz DEFAULT now())")
    acknowledged: list[tuple[int, float]] = []
    stop = threading.Event()

    def write():
        writer = postgres(lab)
        next_id = 1
        with writer.cursor() as cursor:
            while not stop.is_set():
                cursor.execute("INSERT INTO snapshot_drill (id) VALUES (%s)", (next_id,))
                acknowledged.append((next_id, time.monotonic()))
                next_id += 1
        writer.close()

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(1.0)
    # The standby is snapshotted: what the primary acknowledged before the launch is in the
    # snapshot once the standby has received (and flushed) the primary's WAL up to that point.
    launched = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_lsn()::text")
        launch_lsn = lsn(cursor.fetchone()[0])
    receiver = postgres(lab, standby)

    def received() -> bool:
        with receiver.cursor() as cursor:
            cursor.execute("SELECT pg_last_wal_receive_lsn()::text")
            return lsn(cursor.fetchone()[0]) >= launch_lsn

    assert wait_for(received, 10)
    receiver.close()
    created = run_igops("snapshot", "create", standby, "--yes", "--json", env=env)
    time.sleep(0.5)
    stop.set()
    writer.join()
    assert created.returncode == 0, created.stderr
    result = json.loads(created.stdout)["data"]
    assert result["state"] == "complete" and result["freeze_window_ms"] < 2000
    group_id = result["group_id"]
    assert any(step["title"].startswith("pre-freeze hook") for step in json.loads(created.stdout)["steps"])

    listed = json.loads(run_igops("snapshot", "list", "--host", standby, "--json", env=env).stdout)["data"]["groups"]
    mine = next(group for group in listed if group["group_id"] == group_id)
    assert mine["state"] == "complete" and mine["volumes"] == 2 and len(mine["mounts"]) == 2
    for snapshot in group_snapshots(lab, group_id):
        tags = tags_of(snapshot)
        assert tags["igops:host"] == standby and tags["igops:role"] == "postgres" and tags["igops:freeze-ms"]
        assert tags["igops:raid-index"] == "0" and tags["igops:version"]

    cleanup = ["snapshot", "restore", group_id, "--onto", "db2", "--cleanup", "--yes", "--json"]
    before = restore_traces(lab, group_id)
    try:
        restored = run_igops(
            "snapshot", "restore", group_id, "--onto", "db2", "--port", str(DRILL_PORT), "--yes", "--json", env=env
        )
        assert restored.returncode == 0, restored.stdout + restored.stderr
        data = json.loads(restored.stdout)["data"]
        assert len(data["mounted"]) == 2 and data["postgres"]["port"] == DRILL_PORT
        # The command left a running server on the restored data: ask it.
        counted = subprocess.run(
            [
                *shlex.split(data["postgres"]["psql"]),
                "-X",
                "-A",
                "-t",
                "-c",
                "SELECT count(*), coalesce(min(id), 0), coalesce(max(id), 0), pg_is_in_recovery() FROM snapshot_drill",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        count, low, high, in_recovery = counted.stdout.strip().split("|")
        count, low, high = int(count), int(low), int(high)
        before_launch = [row_id for row_id, at in acknowledged if at < launched]
        assert low == 1 and high == count, "the restored rows are a prefix of the acknowledged writes"
        assert count >= len(before_launch) > 0
        assert count <= len(acknowledged)
        assert in_recovery == "f", "the copy ended recovery: it follows nothing"

        # A second restore of the group onto the host is refused before anything is made.
        volumes_before = group_volumes(lab, group_id)
        again = run_igops("snapshot", "restore", group_id, "--onto", "db2", "--yes", env=env)
        assert again.returncode == ExitCode.REFUSED, again.stdout + again.stderr
        assert "already restored onto db2" in again.stderr and "--cleanup" in again.stderr
        assert len(group_volumes(lab, group_id)) == len(volumes_before)
    finally:
        removed = run_igops(*cleanup, env=env)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert restore_traces(lab, group_id) == before
    assert restored_mounts(group_id) == []
    assert not (Path(lab.model.snapshot.restore_root) / f"{group_id}.postgres").exists()


def test_a_failed_restore_takes_away_what_it_made(lab, tmp_path):
    env = {"IGOPS_CONFIG": str(lab.source)}
    standby = lab.host(standby_of_main(lab))
    created = run_igops("snapshot", "create", standby.name, "--yes", "--json", env=env)
    assert created.returncode == 0, created.stderr
    group_id = json.loads(created.stdout)["data"]["group_id"]
    # Something else is mounted where the restore would put the WAL volume, the second of the
    # two mounts: by then the data volume is made, attached and mounted.
    wal = next(m.path for m in standby.mounts if m.purpose == "wal")
    blocker = Path(lab.model.snapshot.restore_root) / group_id / wal.lstrip("/")
    blocker.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "igops-test-blocker", str(blocker)], check=True)
    before = restore_traces(lab, group_id)
    try:
        failed = run_igops("snapshot", "restore", group_id, "--onto", "db2", "--yes", "--json", env=env)
        assert failed.returncode == ExitCode.FAILED, failed.stdout + failed.stderr
        envelope = json.loads(failed.stdout)
        assert "already a mount point" in envelope["error"]["message"]
        assert "volumes this restore made were detached and deleted" in envelope["error"]["hint"]
        assert restore_traces(lab, group_id) == before
        assert [line for line in restored_mounts(group_id) if not line.startswith("igops-test-blocker")] == []
    finally:
        subprocess.run(["umount", str(blocker)], check=True)
        shutil.rmtree(Path(lab.model.snapshot.restore_root) / group_id, ignore_errors=True)


def test_volume_at_the_pending_snapshot_limit_is_refused_before_any_freeze(lab, tmp_path):
    standby = lab.host(standby_of_main(lab))
    ebs = Ebs(lab)
    volume_id = next(
        a.volume_id for a in ebs.instance_volumes(standby.instance_id) if a.device == standby.mounts[0].device
    )
    made = [
        ebs._ec2.create_snapshot(VolumeId=volume_id, Description="pending-limit probe")["SnapshotId"] for _ in range(5)
    ]
    try:
        faults = Faults(rewrite={"DescribeSnapshots": ("<status>completed</status>", "<status>pending</status>")})
        with proxied_inventory(lab, tmp_path, faults) as config:
            result = run_create(config, standby.name)
        assert result.returncode == ExitCode.REFUSED, result.stderr
        assert "5 pending snapshots" in result.stderr and volume_id in result.stderr
        assert "CreateSnapshots" not in faults.calls and "CreateSnapshot" not in faults.calls
    finally:
        for snapshot_id in made:
            ebs._ec2.delete_snapshot(SnapshotId=snapshot_id)


def test_root_and_non_mounts_are_refused(lab):
    env = {"IGOPS_CONFIG": str(lab.source)}
    root = run_igops("snapshot", "create", standby_of_main(lab), "--mount", "/", "--yes", env=env)
    assert root.returncode == ExitCode.REFUSED and "refusing to freeze /" in root.stderr
    not_a_mount = run_igops("snapshot", "create", standby_of_main(lab), "--mount", "/var/lib", "--yes", env=env)
    assert not_a_mount.returncode == ExitCode.REFUSED and "not a mount point" in not_a_mount.stderr


def test_the_live_primary_is_frozen_only_when_asked_and_the_plan_states_the_stall(lab, tmp_path):
    primary = primary_of_main(lab)
    faults = Faults()
    with proxied_inventory(lab, tmp_path, faults) as config:
        refused = run_create(config, primary)
        assert refused.returncode == ExitCode.REFUSED, refused.stdout + refused.stderr
        assert f"{primary} is the live primary of Postgres cluster main" in refused.stderr
        assert "--allow-primary" in refused.stderr and standby_of_main(lab) in refused.stderr
        assert not {"CreateSnapshots", "CreateSnapshot"} & set(faults.calls)
        assert not freeze_processes()
        planned = run_igops(
            "-c", str(config), "snapshot", "create", primary, "--allow-primary", "--dry-run", "--no-hook", "--json"
        )
    assert planned.returncode == 0, planned.stderr
    envelope = json.loads(planned.stdout)
    stall = envelope["data"]["plan"]["write_stall"]
    assert stall.startswith("WRITE STALL") and "every write" in stall
    assert not {"CreateSnapshots", "CreateSnapshot"} & set(faults.calls)


def test_a_group_left_taking_by_a_killed_create_is_reported_and_pruned(lab, tmp_path):
    standby = standby_of_main(lab)
    # Killed after the snapshots were made and the filesystems thawed, before the group was tagged complete.
    faults = Faults(hold={"CreateTags": 60})
    with proxied_inventory(lab, tmp_path, faults) as proxied:
        igops = start_create(proxied, standby, "--json", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert wait_for(lambda: "CreateTags" in faults.calls, 30)
        igops.kill()
        igops.wait()
    faults.fail["CreateTags"] = 503  # the held call must not tag what the prune below deletes
    config = tmp_path / "stale.toml"
    config.write_text(lab.source.read_text().replace("[snapshot]\n", "[snapshot]\nstale_after_minutes = 0.02\n", 1))
    left = [
        group
        for group in json.loads(run_igops("-c", str(config), "snapshot", "list", "--host", standby, "--json").stdout)[
            "data"
        ]["groups"]
        if group["state"] == "taking"
    ]
    assert left, "the killed create left a group taking"
    group_ids = {group["group_id"] for group in left}
    time.sleep(1.5)  # past the 1.2 s grace
    checked = run_igops("-c", str(config), "check", "--only", "snapshot", "--json")
    # The check judges the cluster, whose groups the standby's are.
    [mine] = [result for result in json.loads(checked.stdout)["data"]["results"] if result["target"] == "main"]
    assert mine["status"] in ("WARNING", "CRITICAL") and all(group_id in mine["summary"] for group_id in group_ids), (
        mine
    )
    pruned = run_igops(
        "-c", str(config), "snapshot", "prune", "--host", standby, "--keep-last", "100", "--yes", "--json"
    )
    assert pruned.returncode == 0, pruned.stderr
    assert group_ids <= set(json.loads(pruned.stdout)["data"]["deleted"])
    for group_id in group_ids:
        assert group_snapshots(lab, group_id) == []
    # The killed run stays listed as interrupted (and `igops check` warns of it) until someone
    # ends it: its abort finds nothing left to undo once the prune took the group.
    from igops import operations_view

    [record] = [
        record
        for record in operations_view.list_operations(lab, include_ended=True).records
        if record["kind"] == "snapshot-create" and record.get("pid") == igops.pid
    ]
    assert record["status"] == "interrupted", record
    aborted = run_igops("-c", str(lab.source), "ops", "abort", record["id"], "--yes", "--json")
    assert aborted.returncode == 0, aborted.stderr[-3000:]


@contextmanager
def filesystem_on_a_volume_that_can_stop(tmp_path: Path):
    """(inner mount, outer mount): an XFS whose loop device's image lives on a second XFS. While
    the outer one is frozen, the inner one's writes to its device hang, as they do on an EBS
    volume that stopped answering; thawing the outer one lets them through. Everything is taken
    down afterwards, thawed first, whatever the test left."""
    made: list[tuple[str, str]] = []  # (loop device, mount point), in the order made

    def filesystem(image: Path, mount: Path) -> None:
        image.touch()
        os.truncate(image, 320 << 20)  # mkfs.xfs's smallest
        device = subprocess.run(
            ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        made.append((device, ""))
        subprocess.run(["mkfs.xfs", "-q", device], check=True, capture_output=True)
        mount.mkdir()
        subprocess.run(["mount", device, str(mount)], check=True, capture_output=True)
        made[-1] = (device, str(mount))

    try:
        filesystem(tmp_path / "outer.img", tmp_path / "outer")
        filesystem(tmp_path / "outer" / "inner.img", tmp_path / "inner")
        yield str(tmp_path / "inner"), str(tmp_path / "outer")
    finally:
        for device, mount in reversed(made):
            if mount:
                subprocess.run(["fsfreeze", "--unfreeze", mount], capture_output=True)
                subprocess.run(["umount", mount], capture_output=True)
            subprocess.run(["losetup", "-d", device], capture_output=True)


def was_frozen(mount: str) -> bool:
    """Whether `mount` was frozen; it is thawed in any case (a thaw of a thawed one is EINVAL)."""
    import errno
    import fcntl

    from igops.agent.freeze import FITHAW

    fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as exc:
        assert exc.errno == errno.EINVAL, exc
        return False
    finally:
        os.close(fd)


def test_a_freeze_completing_after_its_deadline_on_a_closed_channel_is_thawed(tmp_path):
    """The volume stops answering while the freeze program syncs before its freeze. The 1 s
    deadline passes: the watchdog's thaw finds nothing frozen yet, and igops gives up and closes
    the channel. Then the volume answers again and the freeze completes, with no one to report
    it to: the filesystem must not stay frozen."""
    if os.geteuid() != 0:
        pytest.skip("needs root: loop devices, mounts and freezes")
    with filesystem_on_a_volume_that_can_stop(tmp_path) as (inner, outer):
        subprocess.run(["fsfreeze", "--freeze", outer], check=True)
        Path(inner, "dirty").write_bytes(os.urandom(8 << 20))  # for the sync to write, and hang on
        freezer = subprocess.Popen(
            [sys.executable, "-I", "-S", str(ROOT / "igops/agent/freeze.py"), "1", inner],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(2)  # past the deadline, the freezer still in its sync
            assert freezer.poll() is None, "the freezer should still wait on the stopped volume"
            freezer.stdin.close()
            freezer.stdout.close()
        finally:
            subprocess.run(["fsfreeze", "--unfreeze", outer], check=True)
        freezer.wait(30)
        assert not was_frozen(inner), "a freeze that completed after its deadline was left on"
        assert wait_for(lambda: not processes_freezing(inner), 5), "its watchdog stayed"


def processes_freezing(mount: str) -> list[int]:
    """The freeze programs, and their watchdogs, whose command line names `mount`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            arguments = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"freeze" in b" ".join(arguments) and mount.encode() in arguments:
            found.append(int(proc.name))
    return found
