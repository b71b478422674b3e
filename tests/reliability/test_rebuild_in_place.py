"""`igops snapshot restore GROUP --onto STANDBY --in-place` under the app's load (docs/pitr.md):
the standby main's db2 is rebuilt from its own group, taken while writes went on.

- Refused without --yes, onto the primary, and with a target: nothing changes.
- Killed as it mounts the new volume, then aborted: the old volumes are back at their mounts,
  the volumes made are gone, and db2 streams from the primary again.
- Run to the end: db2's mounts are volumes made from the group, the old ones are kept detached
  and tagged, its fstab names the new filesystems, it streams from the primary, holds what the
  primary holds once replay catches up, and `lab up` keeps it so. No acknowledged write is lost.
- SIGKILLed at every step of its plan, each from a group db2 does not run on, then resumed (odd steps, by
  default: run again, as `ops resume` says) or aborted (even ones; see ODD_STEPS): a resume
  leaves db2 on volumes from that group, an abort on the ones it had; either way db2 streams
  from the primary again, and no acknowledged write is lost.
- Cut off between a volume's unmount and its detach (the volume at no mount, still attached),
  then aborted: it is mounted again; run again: it is detached and the rebuild goes on, and the
  fstab entry of a mount the cut-off run rebuilt is pointed at it again.
- Its start run again while db2 still replays (not yet answering, like a shutdown): waited for
  until it answers, neither started twice nor waited out as a shutdown.
- The undo of its start stops db2 when it runs, and passes over it when it does not (a run cut
  off as the start began).
- Killed after its first swap (/data on a volume made from the group, its own volume detached),
  then run again: the rerun supersedes the killed run and takes over putting /data's volume
  back. Run again through an AWS proxy that fails CreateVolume, it fails making /wal's volume and
  its own undo puts both old volumes back; killed again, `ops abort` of the rerun does. Either
  way db2 streams from the primary on its own volumes, and `ops abort` of the superseded run
  refuses, naming the rerun.
"""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from igops.errors import ExitCode
from igops.lab import state
from igops.lab.faults import Faults
from tests.conftest import run_igops
from tests.labtools import igops, postgres, verify_lab_ledger, wait_for
from tests.reliability.test_failover import IN_FLIGHT_RATE, Load, lab_up, pg_state, restore_home
from tests.reliability.test_operations_killed import (
    interrupted_run,
    killed_at,
    landed_in,
    nothing_lost,
    steps_planned,
    way_for,
)
from tests.reliability.test_snapshot_under_faults import proxied_inventory

pytestmark = pytest.mark.lab

STANDBY = "db2"
PURPOSES = ("data", "wal")


def mounted(lab, ebs) -> dict[str, str]:
    from igops.pg.rebuild_actions import mounted_volumes

    mounts = [str(state.paths().mount_point(STANDBY, purpose)) for purpose in PURPOSES]
    return mounted_volumes(lab, ebs, lab.host(STANDBY), mounts)


def volume_tags(ebs, volume_id: str) -> dict[str, str]:
    from igops.ebs import tags_of

    volume = ebs.volume(volume_id)
    assert volume is not None, volume_id
    return tags_of(volume) | {"state": volume["State"]}


def streams(lab) -> bool:
    nodes = {node["name"]: node for node in pg_state(lab, "main")["nodes"]}
    return nodes[STANDBY]["streaming_from"] == "db1"


def photo_counts(lab, node: str) -> list[int]:
    connection = postgres(lab, node, "instagram")
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT string_agg(format('SELECT count(*) FROM %I.photos', nspname), ' UNION ALL ' ORDER BY nspname) "
                "FROM pg_namespace WHERE nspname LIKE 'insta%'"
            )
            cursor.execute(cursor.fetchone()[0])
            return [row[0] for row in cursor.fetchall()]
    finally:
        connection.close()


def caught_up(lab) -> bool:
    primary, standby = postgres(lab, "db1"), postgres(lab, STANDBY)
    try:
        with primary.cursor() as cursor:
            cursor.execute("SELECT pg_current_wal_lsn()")
            target = cursor.fetchone()[0]
        with standby.cursor() as cursor:
            cursor.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,))
            return bool(cursor.fetchone()[0])
    finally:
        primary.close()
        standby.close()


def restore_command_of(auto: Path) -> str | None:
    return next((line for line in auto.read_text().splitlines() if line.startswith("restore_command")), None)


@pytest.mark.timeout(1200)
def test_a_standby_is_rebuilt_in_place_from_its_group_and_an_abort_puts_its_volumes_back(lab, tmp_path):
    from igops.ebs import Ebs

    restore_home(lab)
    ebs = Ebs(lab)
    before = mounted(lab, ebs)
    assert len(before) == 2, before
    auto = Path(lab.path_for(lab.model.postgres.data_directory, lab.host(STANDBY))) / "postgresql.auto.conf"
    restore_line = restore_command_of(auto)  # what the group will hold (a rebuilt lab's db2 has one)
    with Load(lab, tmp_path, rate=IN_FLIGHT_RATE) as load:
        created, envelope = igops(lab, "snapshot", "create", STANDBY, "--yes", timeout=300)
        assert created.returncode == 0, created.stderr[-3000:]
        group = envelope["data"]["group_id"]
        rebuild = ["snapshot", "restore", group, "--onto", STANDBY, "--in-place"]

        refused, _ = igops(lab, *rebuild)
        assert refused.returncode == ExitCode.USAGE and "--yes" in refused.stderr, refused.stderr
        refused, _ = igops(lab, "snapshot", "restore", group, "--onto", "db1", "--in-place", "--yes")
        assert refused.returncode != 0 and "runs the primary of main" in refused.stderr, refused.stderr
        refused, _ = igops(lab, *rebuild, "--to", "2026-01-01 00:00:00", "--yes")
        assert refused.returncode == ExitCode.USAGE, refused.stderr
        planned, envelope = igops(lab, *rebuild, "--dry-run")
        assert planned.returncode == 0, planned.stderr[-3000:]
        titles = envelope["data"]["plan"]["steps"]
        assert mounted(lab, ebs) == before, "refusals and the dry run changed nothing"

        # Killed as it mounts the first new volume, then aborted: everything as before.
        step = next(number for number, title in enumerate(titles, 1) if ": mount it at" in title)
        assert killed_at(lab, rebuild, step) is not None
        listed, envelope = igops(lab, "ops", "list")
        [interrupted] = [r for r in envelope["data"]["records"] if r["kind"] == "pg-rebuild"]
        aborted, _ = igops(lab, "ops", "abort", interrupted["id"], "--yes", timeout=600)
        assert aborted.returncode == 0, aborted.stderr[-3000:]
        assert mounted(lab, ebs) == before, "the old volumes are back"
        assert wait_for(lambda: streams(lab), timeout=60, interval=0.2), pg_state(lab, "main")

        # The rebuild, to the end.
        done, envelope = igops(lab, *rebuild, "--yes", "--reason", "disk errors on db2", timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        print("\n" + "\n".join(line for line in done.stderr.splitlines() if line.startswith(("[", "    ok"))))
        after = mounted(lab, ebs)
        assert set(after) == set(before) and not set(after.values()) & set(before.values()), (before, after)
        for mount, volume_id in after.items():
            tags = volume_tags(ebs, volume_id)
            assert tags["igops:group"] == group and tags["igops:rebuilds"] == STANDBY, tags
            assert tags.get("igops:purpose"), f"the new volume took the old one's tags: {tags}"
            assert not tags.get("Name", "").endswith("(replaced)"), tags
            old = volume_tags(ebs, before[mount])
            assert old["state"] == "available" and old["igops:replaced-by"] == group, old
        for mount in after:
            assert fstab_names_what_is_mounted(mount), state.paths().fstab(STANDBY).read_text()
        assert wait_for(lambda: streams(lab), timeout=60, interval=0.2), pg_state(lab, "main")
        # The archive's restore_command served the catch-up; then the data's own is back (or none).
        assert restore_command_of(auto) == restore_line, auto.read_text()
        assert "put back the restore_command" in done.stderr, done.stderr[-3000:]
    assert wait_for(lambda: caught_up(lab), timeout=120, interval=0.2)
    assert photo_counts(lab, STANDBY) == photo_counts(lab, "db1")
    assert pg_state(lab, "main")["problems"] == []
    result = verify_lab_ledger(load.ledger)
    assert result.ok, result.missing_writes[:5]

    lab_up()
    assert mounted(lab, ebs) == after, "lab up keeps the volumes swapped in"
    assert wait_for(lambda: streams(lab), timeout=60, interval=0.2), pg_state(lab, "main")


@pytest.mark.timeout(1500)
def test_a_rebuild_killed_at_every_step_is_resumed_or_aborted_and_db2_streams_again(lab, tmp_path):
    from igops.ebs import Ebs

    restore_home(lab)
    ebs = Ebs(lab)
    outcomes = []
    with Load(lab, tmp_path, duration=3600, rate=IN_FLIGHT_RATE) as load:
        count, refusal_seen = None, False
        # Each kill needs a group db2 does not run on: a rebuild leaves the mounts already rebuilt
        # from its group as they are. Two groups serve in turn (after a resume, db2 runs on
        # volumes of one, so the other serves next; after an abort, the same one again): a
        # rebuild from the older of them catches up from the archive, as one from any group does.
        groups: list[str] = []
        runs_on = None  # the group db2's volumes were made from, once a resume rebuilt it
        number = 1
        while count is None or number <= count:
            before = mounted(lab, ebs)
            began = time.monotonic()
            group = next((candidate for candidate in groups if candidate != runs_on), None)
            if group is None:
                created, envelope = igops(lab, "snapshot", "create", STANDBY, "--yes", timeout=300)
                assert created.returncode == 0, created.stderr[-3000:]
                group = envelope["data"]["group_id"]
                groups.append(group)
            rebuild = ["snapshot", "restore", group, "--onto", STANDBY, "--in-place"]
            count = count or steps_planned(lab, *rebuild)
            started = time.monotonic()
            kill = killed_at(lab, rebuild, number)
            assert kill is not None
            killed = time.monotonic()
            record = interrupted_run(lab, "pg-rebuild", kill, 30)
            listed = time.monotonic()
            if record is None:
                outcomes.append(f"({number}) the run ended before the signal landed")
                number, runs_on = number + 1, group  # it rebuilt db2 from the group
                continue
            landed = landed_in(record, kill)
            way = way_for(landed)
            if way == "resume" and not refusal_seen:
                # A rebuild is resumed by running it again, as `ops resume` says (whatever the
                # step: the refusal is the kind's, so it is read once).
                done, _ = igops(lab, "ops", way, record["id"], "--yes", timeout=600)
                assert done.returncode == ExitCode.REFUSED, (number, done.stderr[-3000:])
                assert "continues from where the interrupted run stopped" in done.stderr, done.stderr
                refusal_seen = True
            if way == "resume":
                done, _ = igops(lab, *rebuild, "--yes", "--reason", f"resume of kill {number}", timeout=900)
            else:
                done, _ = igops(lab, "ops", way, record["id"], "--yes", timeout=600)
            assert done.returncode == 0, (number, way, done.stderr[-3000:])
            continued = time.monotonic()
            after = mounted(lab, ebs)
            assert set(after) == set(before), (number, way, before, after)
            if way == "abort":
                assert after == before, f"step {landed}: the abort did not put db2's volumes back"
            for volume_id in after.values():
                tags = volume_tags(ebs, volume_id)
                assert way == "abort" or tags["igops:group"] == group, (number, after)
                assert not tags.get("Name", "").endswith("(replaced)"), (number, way, tags)
            assert wait_for(lambda: streams(lab), timeout=60, interval=0.2), (number, way, pg_state(lab, "main"))
            if way == "resume":
                runs_on = group
            outcomes.append(
                f"[{landed}] {way}: s to create {started - began:.1f}, kill {killed - started:.1f}, listed "
                f"{listed - killed:.1f}, {way} {continued - listed:.1f}, streams {time.monotonic() - continued:.1f}"
            )
            number += 1
        assert load.running
    assert wait_for(lambda: caught_up(lab), timeout=120, interval=0.2)
    assert photo_counts(lab, STANDBY) == photo_counts(lab, "db1")
    assert pg_state(lab, "main")["problems"] == []
    nothing_lost(load, outcomes)


def test_the_undo_of_a_start_stops_a_member_that_runs_and_passes_over_one_that_does_not(lab):
    """The abort of a rebuild cut off as it began db2's start (a drill found it): the start may
    not have begun, and repmgr's stop fails on a member that does not run. The undo stops db2
    when its postmaster runs, waits until that is gone, and passes over one that is not there."""
    from igops.pg.actions import PgActions

    restore_home(lab)
    actions = PgActions(lab)
    try:
        assert actions.stop_rebuilt(STANDBY) == "stopped"
        db2 = next(node for node in pg_state(lab, "main")["nodes"] if node["name"] == STANDBY)
        assert db2["state"].startswith("stopped"), db2
        assert actions.stop_rebuilt(STANDBY) == "it was not running"
    finally:
        lab_up()
    assert wait_for(lambda: streams(lab), timeout=60, interval=0.2), pg_state(lab, "main")


def fstab_names_what_is_mounted(mount: str) -> bool:
    source = subprocess.run(["findmnt", "-no", "SOURCE", mount], capture_output=True, text=True).stdout.strip()
    uuid = subprocess.run(["blkid", "-o", "value", "-s", "UUID", source], capture_output=True, text=True).stdout
    return f"UUID={uuid.strip()}\t{mount}\t" in state.paths().fstab(STANDBY).read_text()


def cut_off_after_the_unmount(lab, ebs, volume_id: str, group: str, mount: str) -> None:
    """What a run killed between a swap's unmount and its detach leaves, made exact from wherever
    the kill landed in that step: the volume tagged as taken out, unmounted, still attached."""
    from igops.pg.rebuild_actions import TAG_REPLACED_BY, TAG_REPLACED_ON

    volume = ebs.volume(volume_id)
    assert volume is not None, volume_id
    if not volume.get("Attachments"):
        ebs.attach(volume_id, lab.host(STANDBY).instance_id)
    ebs.tag([volume_id], {TAG_REPLACED_BY: group, TAG_REPLACED_ON: f"{STANDBY}:{mount}"})
    if subprocess.run(["mountpoint", "-q", mount], check=False).returncode == 0:
        subprocess.run(["umount", mount], check=True)


@pytest.mark.timeout(900)
def test_a_rebuild_cut_off_between_an_unmount_and_its_detach_is_aborted_or_run_again(lab, tmp_path):
    """The volume is at no mount then, so it is found by the tags the step gave it first: an abort
    mounts it again where it was, a run again detaches it and goes on."""
    from igops.ebs import Ebs

    restore_home(lab)
    ebs = Ebs(lab)
    data, wal = (str(state.paths().mount_point(STANDBY, purpose)) for purpose in PURPOSES)
    with Load(lab, tmp_path, rate=IN_FLIGHT_RATE) as load:
        created, envelope = igops(lab, "snapshot", "create", STANDBY, "--yes", timeout=300)
        assert created.returncode == 0, created.stderr[-3000:]
        group = envelope["data"]["group_id"]
        rebuild = ["snapshot", "restore", group, "--onto", STANDBY, "--in-place"]
        planned, envelope = igops(lab, *rebuild, "--dry-run")
        assert planned.returncode == 0, planned.stderr[-3000:]
        titles = envelope["data"]["plan"]["steps"]
        step = next(number for number, title in enumerate(titles, 1) if f"unmount {wal} and detach" in title)
        for way in ("abort", "resume"):
            before = mounted(lab, ebs)
            record = interrupted_run(lab, "pg-rebuild", killed_at(lab, rebuild, step), 30)
            assert record is not None, "the run ended before the signal landed"
            cut_off_after_the_unmount(lab, ebs, before[wal], group, wal)
            if way == "abort":
                done, _ = igops(lab, "ops", "abort", record["id"], "--yes", timeout=600)
            else:
                # The data mount, rebuilt before the kill, as a run cut off inside its mount step
                # leaves it: mounted, its fstab entry not yet pointed at it.
                fstab = state.paths().fstab(STANDBY)
                elsewhere = "UUID=00000000-0000-0000-0000-000000000000"
                lines = fstab.read_text().splitlines(keepends=True)
                fstab.write_text("".join(re.sub(r"^\S+", elsewhere, x) if f"\t{data}\t" in x else x for x in lines))
                assert not fstab_names_what_is_mounted(data)
                done, _ = igops(lab, *rebuild, "--yes", "--reason", "cut off after an unmount", timeout=900)
            assert done.returncode == 0, (way, done.stderr[-3000:])
            after = mounted(lab, ebs)
            old = volume_tags(ebs, before[wal])
            if way == "abort":
                assert after == before, (before, after)
                assert "igops:replaced-by" not in old, old
            else:
                assert set(after) == set(before) and after[wal] != before[wal], (before, after)
                assert old["state"] == "available" and old["igops:replaced-by"] == group, old
                assert fstab_names_what_is_mounted(data) and fstab_names_what_is_mounted(wal)
            assert wait_for(lambda: streams(lab), timeout=60, interval=0.2), (way, pg_state(lab, "main"))
    result = verify_lab_ledger(load.ledger)
    assert result.ok, result.missing_writes[:5]


def postmaster_status(lab) -> tuple[int, str]:
    """db2's postmaster pid and the status its postmaster.pid gives (line 8), or (0, "") before
    the postmaster has written it."""
    pidfile = Path(lab.path_for(lab.model.postgres.data_directory, lab.host(STANDBY))) / "postmaster.pid"
    fields = pidfile.read_text().splitlines() if pidfile.exists() else []
    return (int(fields[0]), fields[7].strip()) if len(fields) > 7 else (0, "")


def test_a_start_run_again_while_the_standby_still_replays_waits_until_it_answers(lab):
    """A rebuild cut off after its start and run again finds db2's postmaster replaying towards
    its backup's end, not yet consistent: it does not answer, as during a shutdown. The step takes
    it for the start it is, neither a shutdown to wait out (it failed so after a minute) nor a
    postmaster to start a second time, and waits until it answers.

    db2 is held there as a group's volumes hold it: restarted with a backup_label of a backup
    still under way on db1, it replays until db1 ends that backup."""
    import threading

    from igops import failover
    from igops.host_commands import ssh
    from igops.lab.postgres import Node
    from igops.pg.hostcmd import start_unless_answering

    restore_home(lab)
    node = Node(state.paths(), STANDBY)
    host = lab.host(STANDBY)
    backup = postgres(lab, "db1")
    ended = threading.Event()

    def end_backup() -> None:  # db1 writes the backup's end record: db2's replay reaches it
        if not ended.is_set():
            ended.set()
            with backup.cursor() as cursor:
                cursor.execute("SELECT pg_backup_stop(false)")

    try:
        with backup.cursor() as cursor:
            cursor.execute("SELECT pg_backup_start('igops rebuild drill', true)")
            began = cursor.fetchone()[0]
            cursor.execute("SELECT checkpoint_lsn, redo_lsn, redo_wal_file, timeline_id FROM pg_control_checkpoint()")
            checkpoint, redo, redo_file, timeline = cursor.fetchone()
        assert redo == began, "a checkpoint came between the backup's start and its read"
        node.pg_ctl("stop", "-m", "fast", "-w")
        label = node.pgdata / "backup_label"
        label.write_text(
            f"START WAL LOCATION: {redo} (file {redo_file})\nCHECKPOINT LOCATION: {checkpoint}\n"
            "BACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-01-01 00:00:00 UTC\n"
            f"LABEL: igops rebuild drill\nSTART TIMELINE: {timeline}\n"
        )
        shutil.chown(label, "postgres", "postgres")
        node.pg_ctl("start", "-W", "-l", str(node.log))
        assert wait_for(lambda: postmaster_status(lab)[1] == "starting", 30, interval=0.2)
        pid = postmaster_status(lab)[0]
        said = ssh(lab, host, start_unless_answering(lab, host, 2), timeout=30)
        assert said.ok and said.stdout.strip() == "starting", (said.stdout, said.stderr)
        assert postmaster_status(lab) == (pid, "starting"), "started a second time, or stopped"
        finishing = threading.Timer(3.0, end_backup)
        finishing.start()
        detail = failover.PgActions(lab).start_standby(STANDBY)
        finishing.join()
        assert postmaster_status(lab)[0] == pid, "started a second time"
    finally:
        end_backup()
        backup.close()
    assert detail == "was starting already, answering", detail
    assert wait_for(lambda: streams(lab), timeout=60, interval=0.2), pg_state(lab, "main")


def killed_after_the_first_swap(lab, ebs, rebuild: list[str], group: str, before: dict[str, str]) -> dict:
    """The rebuild SIGKILLed as it begins taking /wal's volume out: /data's was taken out and
    /data mounted on a volume made from the group. Returns the killed run's record."""
    data, wal = (str(state.paths().mount_point(STANDBY, purpose)) for purpose in PURPOSES)
    planned, envelope = igops(lab, *rebuild, "--dry-run")
    assert planned.returncode == 0, planned.stderr[-3000:]
    titles = envelope["data"]["plan"]["steps"]
    step = next(number for number, title in enumerate(titles, 1) if f"unmount {wal} and detach" in title)
    record = interrupted_run(lab, "pg-rebuild", killed_at(lab, rebuild, step), 30)
    assert record is not None, "the run ended before the signal landed"
    swapped = mounted(lab, ebs)
    assert swapped.get(data) not in (None, before[data]), (before, swapped)
    assert volume_tags(ebs, swapped[data])["igops:group"] == group
    old = volume_tags(ebs, before[data])
    assert old["state"] == "available" and old["igops:replaced-by"] == group, old
    return record


def rerun_takes_over(lab, rebuild: list[str], old_data: str, config: Path | None = None) -> list[str]:
    """The rerun's plan (through `config`, else the lab's inventory): its first step makes the
    volume the killed run took out of /data the rerun's to put back. Returns its step titles."""
    data = str(state.paths().mount_point(STANDBY, "data"))
    planned = run_igops("-c", str(config or lab.source), *rebuild, "--dry-run", "--json")
    assert planned.returncode == 0, planned.stderr[-3000:]
    titles = json.loads(planned.stdout)["data"]["plan"]["steps"]
    # /wal's too, if the kill landed after its unmount
    assert f"{old_data} ({data})" in titles[0] and "taken out by an earlier run" in titles[0], titles
    return titles


def back_on_its_own_volumes(lab, ebs, group: str, before: dict[str, str]) -> None:
    """db2's own volumes at their mounts again, untagged, named as before; nothing made from
    the group left; db2 streams from the primary."""
    from igops.pg.rebuild_actions import TAG_REBUILDS

    assert mounted(lab, ebs) == before
    for volume_id in before.values():
        tags = volume_tags(ebs, volume_id)
        assert "igops:replaced-by" not in tags and not tags.get("Name", "").endswith("(replaced)"), tags
    assert ebs.volumes({"igops:group": group, TAG_REBUILDS: STANDBY}) == []
    assert wait_for(lambda: streams(lab), timeout=60, interval=0.2), pg_state(lab, "main")


def superseded_by(lab, killed: dict) -> str:
    """The rerun that superseded the killed run, once `ops abort` of the killed run refused and
    named it."""
    from igops import operations_view

    [record] = [r for r in operations_view.list_operations(lab, include_ended=True).records if r["id"] == killed["id"]]
    assert record["status"] == "superseded", record
    refused, _ = igops(lab, "ops", "abort", killed["id"], "--yes")
    assert refused.returncode == ExitCode.REFUSED, refused.stderr[-3000:]
    assert f"superseded by {record['superseded_by']}" in refused.stderr, refused.stderr
    return str(record["superseded_by"])


@pytest.mark.timeout(900)
def test_a_rerun_puts_back_what_a_killed_run_took_out_when_it_fails_or_is_aborted(lab, tmp_path):
    """A killed run is superseded by its rerun, so nothing but the rerun can put back the volume
    it took out of /data: the rerun's first step takes that over (found by its tags). Before,
    a rerun that failed put back only what it had taken out itself, and /data's own volume was
    left detached, db2 stopped on a mix of the group's /data and its own /wal."""
    from igops.ebs import Ebs

    restore_home(lab)
    ebs = Ebs(lab)
    before = mounted(lab, ebs)
    assert len(before) == 2, before
    data = str(state.paths().mount_point(STANDBY, "data"))
    created, envelope = igops(lab, "snapshot", "create", STANDBY, "--yes", timeout=300)
    assert created.returncode == 0, created.stderr[-3000:]
    group = envelope["data"]["group_id"]
    rebuild = ["snapshot", "restore", group, "--onto", STANDBY, "--in-place"]

    # Run again through a proxy that fails CreateVolume: the rerun fails making /wal's volume.
    killed = killed_after_the_first_swap(lab, ebs, rebuild, group, before)
    faults = Faults(fail={"CreateVolume": 400})
    with proxied_inventory(lab, tmp_path, faults) as config:
        rerun_takes_over(lab, rebuild, before[data], config)
        failed = run_igops("-c", str(config), *rebuild, "--yes", "--reason", "rerun, made to fail", timeout=900)
    assert failed.returncode == ExitCode.FAILED, failed.stderr[-3000:]
    assert "InjectedFault" in failed.stderr and "CreateVolume" in faults.calls, failed.stderr[-3000:]
    assert f"start {STANDBY} on them: undone" in failed.stderr, failed.stderr[-3000:]
    back_on_its_own_volumes(lab, ebs, group, before)
    rerun_id = superseded_by(lab, killed)
    refused, _ = igops(lab, "ops", "abort", rerun_id, "--yes")  # its own undo ran: nothing is left to abort
    assert refused.returncode == ExitCode.REFUSED and "has ended (failed)" in refused.stderr, refused.stderr

    # Killed again, then the rerun killed as it waits for db2 to stream, and aborted.
    killed = killed_after_the_first_swap(lab, ebs, rebuild, group, before)
    titles = rerun_takes_over(lab, rebuild, before[data])
    step = next(number for number, title in enumerate(titles, 1) if "wait until it streams" in title)
    rerun = interrupted_run(lab, "pg-rebuild", killed_at(lab, rebuild, step), 30)
    assert rerun is not None, "the rerun ended before the signal landed"
    assert all(volume_id not in before.values() for volume_id in mounted(lab, ebs).values())
    aborted, _ = igops(lab, "ops", "abort", rerun["id"], "--yes", timeout=600)
    assert aborted.returncode == 0, aborted.stderr[-3000:]
    back_on_its_own_volumes(lab, ebs, group, before)
    assert superseded_by(lab, killed) == rerun["id"]
