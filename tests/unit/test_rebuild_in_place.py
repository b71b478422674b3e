"""An in-place rebuild (igops.restore_in_place, igops.pg.rebuild_actions) without a lab.

- Its host-side shell, run here with a stand-in for blkid: fstab's entry for the mount names the
  new filesystem by UUID, every other line kept; the catch-up's restore_command, and the data's
  own put back.
- A rerun of a killed rebuild, planned and run against moto's EC2 in this process, with a
  stand-in for db2's mounts and Postgres: the volumes the killed run took out are the rerun's to
  put back, by its own undo or `ops abort` of it."""

import re
import subprocess
import urllib.request
from pathlib import Path

import boto3
import pytest

from igops import interrupted, restore_in_place
from igops.ebs import Ebs, tags_of
from igops.errors import IgopsError, RefusedError
from igops.inventory import load_file
from igops.operations.steps import StepFailed, execute, spec
from igops.output import Reporter
from igops.pg import rebuild_actions
from igops.pg.actions import PgActions
from igops.pg.cluster import PgClusterState, PgNode
from igops.pg.rebuild_actions import (
    _FSTAB,
    _PUT_BACK_RESTORE,
    _SET_CATCH_UP_RESTORE,
    REPLACED_SUFFIX,
    TAG_REBUILDS,
    TAG_REPLACED_BY,
    _sh,
    made_for,
)
from igops.snapshot_groups import STATE_COMPLETE, TAG_FSTYPE, TAG_GROUP, TAG_GROUP_SIZE, TAG_HOST, TAG_MOUNT, TAG_STATE
from tests.unit.in_process import moto_endpoint
from tests.unit.inventories import unit_inventory


def run_fstab(tmp_path: Path, text: str | None, mount: str) -> tuple[str, str | None]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    blkid = bin_dir / "blkid"
    blkid.write_text("#!/bin/sh\necho 0b1c-new-uuid\n")
    blkid.chmod(0o755)
    fstab = tmp_path / "fstab"
    if text is not None:
        fstab.write_text(text)
    done = subprocess.run(
        ["sh", "-c", _sh(_FSTAB, str(fstab), mount, "/dev/loop9")],
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        check=True,
    )
    return done.stdout.strip(), fstab.read_text() if fstab.exists() else None


def test_the_mount_entry_names_the_new_filesystem_and_the_rest_stays(tmp_path):
    text = "# static\nUUID=old-1\t/data\txfs\tnoatime\t0\t2\nUUID=old-2 /wal xfs defaults 0 2\n"
    said, after = run_fstab(tmp_path, text, "/data")
    assert said == "UUID=0b1c-new-uuid"
    assert after == "# static\nUUID=0b1c-new-uuid\t/data\txfs\tnoatime\t0\t2\nUUID=old-2 /wal xfs defaults 0 2\n"


def test_no_entry_for_the_mount_or_no_fstab_leaves_it_alone(tmp_path):
    said, after = run_fstab(tmp_path, "UUID=old-2 /wal xfs defaults 0 2\n# /data was here\n", "/data")
    assert said == "no entry" and after == "UUID=old-2 /wal xfs defaults 0 2\n# /data was here\n"
    assert not list(tmp_path.glob("fstab.igops"))


def test_no_fstab_at_all(tmp_path):
    assert run_fstab(tmp_path, None, "/data") == ("", None)


def test_restore_command_is_written_in_postgresql_conf_quoting():
    from igops.pg.rebuild_actions import _conf_literal

    assert (
        _conf_literal('pgbackrest --stanza=main archive-get %f "%p"')
        == "'pgbackrest --stanza=main archive-get %f \"%p\"'"
    )
    assert _conf_literal("it's a\\b") == "'it''s a\\\\b'"


ARCHIVE = "restore_command = 'pgbackrest --stanza=main archive-get %f \"%p\"'"


def sh(script: str, *args: str) -> str:
    return subprocess.run(["sh", "-c", _sh(script, *args)], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("own", [None, "restore_command = 'cp /mnt/wal/%f \"%p\"'"])
def test_the_catch_up_restore_command_is_set_then_the_datas_own_put_back(tmp_path, own):
    data = tmp_path / "pgdata"
    data.mkdir()
    auto = data / "postgresql.auto.conf"
    before = "primary_conninfo = 'host=db1'\n" + (own + "\n" if own else "")
    auto.write_text(before)
    sh(_SET_CATCH_UP_RESTORE, str(data), ARCHIVE)
    sh(_SET_CATCH_UP_RESTORE, str(data), ARCHIVE)  # a rerun keeps what the data had, not its own line
    assert auto.read_text() == "primary_conninfo = 'host=db1'\n" + ARCHIVE + "\n"
    said = sh(_PUT_BACK_RESTORE, str(data))
    assert said == ("its own again" if own else "none, as its data had")
    assert auto.read_text() == before and not list(data.glob("igops-rebuild.*")) and not list(data.glob("*.igops"))
    assert sh(_PUT_BACK_RESTORE, str(data)) == "put back already" and auto.read_text() == before


# --- A rerun of a killed rebuild, against moto's EC2 in this process -------------------------
# The rebuild's EBS steps run as they do (swap_out, volume_from_group, mount_rebuilt, swap_back,
# discard_rebuilt, adopt_tags, keep_taken_out, put_back_taken_out); a stand-in host keeps what is
# mounted where (the mount and unmount scripts only move a device in or out of its table), and
# the steps that talk to Postgres or repmgr only record that they ran.

MOUNTS = ("/data", "/wal")
ZONE = "us-east-1a"


@pytest.fixture(scope="module")
def endpoint():
    with moto_endpoint() as url:
        yield url


class Host:
    """db2 as the steps see it: which device is mounted where, and whether Postgres runs."""

    def __init__(self, ebs: Ebs, instance_id: str):
        self.ebs, self.instance_id = ebs, instance_id
        self.mounted: dict[str, str] = {}  # mount -> device
        self.running = True

    def volumes(self) -> dict[str, str]:
        """mount -> the volume mounted there."""
        by_device = {a.device: a.volume_id for a in self.ebs.instance_volumes(self.instance_id)}
        return {mount: by_device[device] for mount, device in self.mounted.items()}

    def mounted_volumes(self, fleet, ebs, host, mounts: list[str]) -> dict[str, str]:
        return {mount: volume for mount, volume in self.volumes().items() if mount in mounts}

    def host_script(self, fleet, host, script: str, what: str) -> str:
        if what.startswith("unmounting "):
            assert not self.running, f"{what} under a running Postgres"
            self.mounted.pop(what.removeprefix("unmounting "), None)
        elif what.startswith("mounting "):
            mount = what.removeprefix("mounting ")
            assert mount not in self.mounted, f"{what} over what is mounted there"
            self.mounted[mount] = re.search(r"/dev/sd[a-z]+", script).group(0)
        elif what.startswith("pointing "):
            return "UUID=0b1c-new-uuid"
        return ""


class Actions(PgActions):
    """PgActions with its EBS steps as they are (RECORDED_EBS, below), the rest stood in for;
    `ran` lists every action run. `fail`: (action, mount) that fails, as a CreateVolume the
    region refuses."""

    def __init__(self, fleet, host: Host, fail: tuple[str, str] | None = None):
        super().__init__(fleet)
        self.host, self.fail, self.ran = host, fail, []

    def _record(self, name: str) -> str:
        self.ran.append(name)
        return name

    def pause_repmgrd(self, on):
        return self._record("pause_repmgrd")

    def unpause_repmgrd(self, members):
        return self._record("unpause_repmgrd")

    def stop(self, node):
        self.host.running = False
        return self._record("stop")

    def wait_stopped(self, node):
        return self._record("wait_stopped")

    def stop_rebuilt(self, node):
        self.host.running = False
        return self._record("stop_rebuilt")

    def start_standby(self, node):
        self.host.running = True
        return self._record("start_standby")

    def prepare_rebuilt(self, node, group_id):
        return self._record("prepare_rebuilt")

    def follow_primary(self, node, primary):
        return self._record("follow_primary")

    def wait_streaming(self, node, primary):
        return self._record("wait_streaming")


RECORDED_EBS = (
    "swap_out",
    "swap_back",
    "volume_from_group",
    "discard_rebuilt",
    "mount_rebuilt",
    "adopt_tags",
    "keep_taken_out",
    "put_back_taken_out",
)


def _recorded(name: str):
    def run(self: Actions, *args):
        self.ran.append(name)
        if self.fail and self.fail[0] == name and self.fail[1] in args:
            raise IgopsError("EC2 CreateVolume failed: InjectedFault", "try again")
        return getattr(PgActions, name)(self, *args)

    return run


for _name in RECORDED_EBS:
    setattr(Actions, _name, _recorded(_name))


class View:
    """What pg_view reads of main: db1 the primary, db2 a standby in `state`."""

    def __init__(self, fleet, state: str):
        self.fleet, self.cluster = fleet, "main"
        db2_role = "standby" if state == "running" else "unknown"
        self.state = PgClusterState(
            "main",
            [PgNode("db1", "10.0.0.21", "primary", "running"), PgNode("db2", "10.0.0.22", db2_role, state)],
            "db1",
            {},
            {},
        )

    def writable(self) -> list[str]:
        return ["db1"]


class Rig:
    """db2 on instance `instance_id` with a volume mounted at each of MOUNTS, and groups of it."""

    def __init__(self, tmp_path, endpoint, monkeypatch):
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unit")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit")
        ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=endpoint)
        instance_id = ec2.run_instances(
            ImageId="ami-0abcdef1234567890", MinCount=1, MaxCount=1, Placement={"AvailabilityZone": ZONE}
        )["Instances"][0]["InstanceId"]
        hosts = "".join(
            f'[[hosts]]\nname = "{name}"\naddress = "{address}"\nroles = ["postgres"]\ninstance_id = "{instance}"\n'
            for name, address, instance in (
                ("db1", "10.0.0.21", "i-0000000000000001"),
                ("db2", "10.0.0.22", instance_id),
            )
        )
        sections = (
            f'[aws]\nregion = "us-east-1"\nendpoint_url = "{endpoint}"\n'
            '[postgres.clusters.main]\nprimary = "db1"\nstandbys = ["db2"]\n' + hosts
        )
        self.fleet = load_file(unit_inventory(tmp_path, [], sections=sections))
        self.ebs = Ebs(self.fleet)
        self.host = Host(self.ebs, instance_id)
        self.original: dict[str, str] = {}
        for mount in MOUNTS:
            volume_id = ec2.create_volume(
                Size=1,
                AvailabilityZone=ZONE,
                TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "Name", "Value": f"db2 {mount}"}]}],
            )["VolumeId"]
            device = self.ebs.attach(volume_id, instance_id)
            self.host.mounted[mount] = device
            self.original[mount] = volume_id
        self.state = "running"
        monkeypatch.setattr(restore_in_place, "pg_view", lambda fleet, cluster: View(fleet, self.state))
        monkeypatch.setattr(restore_in_place, "mounted_volumes", self.host.mounted_volumes)
        monkeypatch.setattr(rebuild_actions, "mounted_volumes", self.host.mounted_volumes)
        monkeypatch.setattr(rebuild_actions, "host_script", self.host.host_script)

    def group(self, group_id: str) -> str:
        """A complete group of db2's volumes as they are now."""
        volumes = self.host.volumes()
        for mount in MOUNTS:
            self.ebs.create_snapshot(
                volumes[mount],
                f"igops {group_id} db2",
                {
                    TAG_GROUP: group_id,
                    TAG_HOST: "db2",
                    TAG_GROUP_SIZE: str(len(MOUNTS)),
                    TAG_MOUNT: mount,
                    TAG_FSTYPE: "xfs",
                    TAG_STATE: STATE_COMPLETE,
                },
            )
        return group_id

    def plan(self, group_id: str) -> restore_in_place.RebuildPlan:
        return restore_in_place.plan_rebuild(self.fleet, self.ebs, group_id, "db2")[0]

    def actions(self, fail: tuple[str, str] | None = None) -> Actions:
        return Actions(self.fleet, self.host, fail)

    def killed_after(self, plan, action: str, mount: str | None = None) -> list[dict]:
        """The plan's steps run up to and with the first `action` (on `mount`), then cut off as a
        SIGKILL cuts it: nothing undone. Returns the journal's intent entries, as the engine
        writes them."""
        actions, entries = self.actions(), []
        for number, step in enumerate(plan.actions, 1):
            entries.append(
                {
                    "event": "intent",
                    "step": number,
                    "title": step.title,
                    "undo": spec(step.undo),
                    "release": spec(step.release),
                    "point_of_no_return": False,
                }
            )
            getattr(actions, step.action)(*step.args)
            if step.action == action and (mount is None or mount in step.args):
                self.state = "running" if self.host.running else "stopped"
                return entries
        raise AssertionError(f"no {action} step")

    def made(self, group_id: str) -> list[str]:
        return [v["VolumeId"] for mount in MOUNTS for v in made_for(self.ebs, group_id, "db2", mount)]

    def replaced_tags(self, volume_id: str) -> dict[str, str]:
        volume = self.ebs.volume(volume_id)
        assert volume is not None, volume_id
        return {key: value for key, value in tags_of(volume).items() if key.startswith("igops:replaced")}


@pytest.fixture
def rig(tmp_path, endpoint, monkeypatch):
    return Rig(tmp_path, endpoint, monkeypatch)


def assert_put_back(rig: Rig, group_id: str) -> None:
    """db2 on its own volumes again, running; nothing made from the group is left."""
    assert rig.host.volumes() == rig.original
    assert rig.host.running
    assert rig.made(group_id) == [] and rig.ebs.volumes({TAG_REBUILDS: "db2"}) == []
    for volume_id in rig.original.values():
        assert rig.replaced_tags(volume_id) == {}, volume_id
        assert not tags_of(rig.ebs.volume(volume_id)).get("Name", "").endswith(REPLACED_SUFFIX)


def test_a_rerun_puts_back_the_volume_a_killed_run_took_out_when_it_fails(rig):
    """Killed after its first swap (/data on a volume made from the group, its own volume
    detached), the rebuild is run again and fails making the /wal volume: the rerun's undo puts
    back /wal's volume, which it took out, and /data's, which the killed run took out, and starts
    db2 on them. Before, /data's was left detached, with db2 stopped on a mix of the two."""
    group_id = rig.group("db2-g1")
    rig.killed_after(rig.plan(group_id), "mount_rebuilt", "/data")
    assert rig.host.volumes()["/data"] in rig.made(group_id) and not rig.host.running

    rerun = rig.plan(group_id)
    first = rerun.actions[0]
    assert first.action == "keep_taken_out"
    assert first.args == ("db2", group_id, (("/data", first.args[2][0][1], rig.original["/data"]),))
    assert f"{rig.original['/data']} (/data), taken out by an earlier run" in first.title
    assert first.undo is not None and first.undo.action == "put_back_taken_out"
    actions = [step.action for step in rerun.actions]
    assert "stop" not in actions and actions.count("swap_out") == 1  # db2 is stopped; /wal is still to swap
    with pytest.raises(StepFailed) as failed:
        execute(rerun.actions, rig.actions(fail=("volume_from_group", "/wal")), Reporter(), rerun.failure_hint)
    undone = [(report.title, report.outcome) for report in failed.value.recovery]
    assert all(outcome in ("undone", "released") for _, outcome in undone), undone
    assert undone[-2][0] == first.undo.title  # the last undo, before repmgrd's unpause
    assert_put_back(rig, group_id)


def test_a_volume_cut_off_after_its_unmount_is_put_back_by_a_rerun_stopped_before_it_detaches_it(rig):
    """Killed between /wal's unmount and its detach (tagged, unmounted, still attached): the rerun
    detaches it in a later step, whose undo would put it back; stopped before that step, the
    take-over's undo puts it back, so db2 never starts without its /wal."""
    from igops.pg.rebuild_actions import TAG_REPLACED_ON

    group_id = rig.group("db2-g9")
    rig.killed_after(rig.plan(group_id), "mount_rebuilt", "/data")
    rig.ebs.tag([rig.original["/wal"]], {TAG_REPLACED_BY: group_id, TAG_REPLACED_ON: "db2:/wal"})
    del rig.host.mounted["/wal"]
    rerun = rig.plan(group_id)
    assert [old for _, _, old in rerun.actions[0].args[2]] == [rig.original["/data"], rig.original["/wal"]]
    assert [step.args[2] for step in rerun.actions if step.action == "swap_out"] == [rig.original["/wal"]]
    with pytest.raises(StepFailed):
        execute(rerun.actions, rig.actions(fail=("mount_rebuilt", "/data")), Reporter(), rerun.failure_hint)
    assert_put_back(rig, group_id)


def test_the_abort_of_a_rerun_killed_at_any_step_puts_back_what_both_runs_took_out(rig, monkeypatch):
    """The take-over is the rerun's first step: killed at any step after it, the rerun's
    journal holds its undo, and `ops abort` of it (superseding left the killed run nothing to
    abort) puts every old volume back."""
    from igops import failover

    group_id = rig.group("db2-g2")
    rig.killed_after(rig.plan(group_id), "mount_rebuilt", "/data")
    rerun = rig.plan(group_id)
    entries = rig.killed_after(rerun, "start_standby")  # both mounts swapped, db2 started on them
    assert rig.host.running and set(rig.host.volumes().values()) == set(rig.made(group_id))
    record = {
        "id": "20261207T000000Z-rerun",
        "kind": "pg-rebuild",
        "title": rerun.title,
        "targets": ["db1", "db2"],
        "resources": [["pg", "main"], ["snapshot-group", group_id]],
        "params": {"group": group_id, "node": "db2"},
    }
    aborting = interrupted.plan_abort(rig.fleet, record, entries)
    assert aborting.spec.steps[-2] == rerun.actions[0].undo.title, aborting.spec.steps  # then repmgrd's unpause
    actions = rig.actions()
    monkeypatch.setattr(failover, "PgActions", lambda fleet: actions)
    aborting.apply(Reporter())
    assert actions.ran.index("stop_rebuilt") < actions.ran.index("put_back_taken_out")
    assert_put_back(rig, group_id)


def test_a_rerun_after_a_run_that_got_to_its_end_puts_nothing_back(rig):
    """Once every volume taken out is named '(replaced)', the rebuild is done: run again, it only
    waits for db2 (no take-over, no undo of its start), and a failure leaves db2 where it is."""
    group_id = rig.group("db2-g3")
    plan = rig.plan(group_id)
    execute(plan.actions, rig.actions(), Reporter(), plan.failure_hint)
    for mount, volume_id in rig.original.items():
        assert tags_of(rig.ebs.volume(volume_id))["Name"] == f"db2 {mount}{REPLACED_SUFFIX}"
    rerun = rig.plan(group_id)
    assert rerun.settling == "db2"
    assert [step.action for step in rerun.actions if step.undo] == []
    assert "keep_taken_out" not in [step.action for step in rerun.actions]


def test_a_volume_made_for_a_group_and_taken_out_by_a_rebuild_from_another_is_not_that_groups_any_more(rig):
    """db2 rebuilt from g4, then from g5, then from g4 again: the volume made from g4 the first
    time is kept for g5's rebuild (taken out, tagged); g4's second rebuild makes a volume of its
    own, and neither takes over nor deletes that one."""
    g4 = rig.group("db2-g4")
    g5 = rig.group("db2-g5")
    for group_id in (g4, g5):
        plan = rig.plan(group_id)
        execute(plan.actions, rig.actions(), Reporter(), plan.failure_hint)
    first_g4 = rig.ebs.volumes({TAG_GROUP: g4, TAG_REBUILDS: "db2"})
    assert len(first_g4) == 2 and all(tags_of(v)[TAG_REPLACED_BY] == g5 for v in first_g4)
    assert rig.made(g4) == []
    plan = rig.plan(g4)
    assert "keep_taken_out" not in [step.action for step in plan.actions]
    assert [step.action for step in plan.actions].count("volume_from_group") == 2
    with pytest.raises(StepFailed):
        execute(plan.actions, rig.actions(fail=("volume_from_group", "/wal")), Reporter(), plan.failure_hint)
    assert all(rig.ebs.volume(v["VolumeId"]) is not None for v in first_g4), "kept for g5's rebuild"
    assert rig.made(g4) == []


def test_a_rebuild_from_another_group_waits_for_an_unfinished_one(rig):
    """g6's rebuild was killed after it took /data's volume out: g7's would take out the volume
    g6 put in, and leave /data's own with nothing to put it back."""
    g6 = rig.group("db2-g6")
    g7 = rig.group("db2-g7")
    rig.killed_after(rig.plan(g6), "swap_out", "/data")
    with pytest.raises(RefusedError, match=f"from group {g6} took {rig.original['/data']} out of /data") as refused:
        rig.plan(g7)
    assert f"igops snapshot restore {g6} --onto db2 --in-place" in (refused.value.hint or "")


def test_the_put_back_changes_nothing_when_a_volume_taken_out_is_gone(rig):
    """Deleting the volume made for a mount whose own volume cannot come back would leave it
    with neither: refused first, db2 left on the volumes made."""
    group_id = rig.group("db2-g8")
    rig.killed_after(rig.plan(group_id), "mount_rebuilt", "/wal")
    rerun = rig.plan(group_id)
    take_over = rerun.actions[0]
    assert [old for _, _, old in take_over.args[2]] == [rig.original["/data"], rig.original["/wal"]]
    before = rig.host.volumes()
    rig.ebs.delete_volume(rig.original["/wal"])
    actions = rig.actions()
    with pytest.raises(IgopsError, match=f"{rig.original['/wal']} \\(taken out of /wal\\) is gone"):
        actions.put_back_taken_out(*take_over.undo.args)
    with pytest.raises(IgopsError, match="nothing was changed"):
        actions.keep_taken_out(*take_over.args)
    assert rig.host.volumes() == before and set(before.values()) == set(rig.made(group_id))
