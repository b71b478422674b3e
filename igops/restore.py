"""Restore a snapshot group onto a host: volumes created and attached in RAID order, arrays
assembled, filesystems mounted and, for a Postgres group, a server started on the restored data
so that the drill ends with a running, queryable copy. `cleanup` takes all of it away again, and
a restore that fails part-way takes away what it made.

What a restore made is found from tags on its volumes (group, host restored to, original mount,
where it is mounted, source host), so a cleanup needs nothing but the group and the host. What
it unmounts is found on the host by the devices the volumes are attached at, not by the tags: a
restore cut off between its mount and its tag has mounted a volume no tag names.
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from igops import remote, snapshot_wal
from igops.errors import IgopsError, RefusedError, RemoteError, UsageError
from igops.host_commands import stdin_into
from igops.operations import conflicts
from igops.output import Reporter, plural
from igops.pg import archive
from igops.pg.rebuild_actions import TAG_REBUILDS
from igops.restore_scripts import (
    PostgresStart,
    host_script,
    mount_script,
    postgres_start,
    prepare_script,
    start_script,
    teardown_script,
)
from igops.restore_target import (
    TIME,
    Recovery,
    RecoveryTarget,
    choose_group,
    promoted_script,
    reached_from_log,
    recovery_files_script,
    refuse_past_archive,
    replayed_bytes,
)
from igops.snapshot_groups import (
    STATE_COMPLETE,
    TAG_FSTYPE,
    TAG_GROUP,
    TAG_HOST,
    TAG_MOUNT,
    TAG_RAID_INDEX,
    TAG_RAID_LEVEL,
    TAG_ROLE,
    check_readable,
    find_group,
    groups,
    in_use,
)

if TYPE_CHECKING:
    from igops.ebs import Ebs
    from igops.inventory import Fleet
    from igops.inventory_model import Host
    from igops.vmtouch import WarmPlan

TAG_RESTORED_TO = "igops:restored-to"
TAG_RESTORED_AT = "igops:restored-at"

# The restored server listens on a Unix socket of its own, never on TCP: a copy of production
# data is not for the network, and a private socket directory cannot collide with a running server.
DEFAULT_PORT = 5499


@dataclass
class RestoreVolume:
    snapshot_id: str
    mount: str
    raid_index: int
    fstype: str


@dataclass
class RestorePlan:
    group_id: str
    source_host: str
    to_host: str
    instance_id: str
    mount_root: str
    mounts: dict[str, list[RestoreVolume]]  # original mount -> members in RAID order
    raid_levels: dict[str, str]
    postgres: PostgresStart | None
    recovery: Recovery | None = None  # a point-in-time restore: where its WAL comes from and goes to
    # Snapshot id -> EBS fast snapshot restore enabled in the host's zone; None: not known.
    fast_restore: dict[str, bool] | None = None
    warm: WarmPlan | None = None  # --warm-from: a member's page cache, copied onto the copy

    def fast_restore_note(self, snapshot_id: str) -> str:
        if self.fast_restore is None:
            return "fast snapshot restore unknown: the EC2 endpoint does not say"
        if self.fast_restore.get(snapshot_id):
            return "fast snapshot restore: initialised at once"
        return "no fast snapshot restore: each block is fetched on its first read"

    def target_path(self, mount: str) -> str:
        return mount if self.mount_root == "/" else f"{self.mount_root.rstrip('/')}/{self.group_id}{mount}"

    def resources(self) -> list[conflicts.Resource]:
        """The host restored onto, and the group: no prune or delete takes it while the restore
        reads it (its snapshots, then for a point in time the archived WAL from its start)."""
        return [conflicts.host(self.to_host), in_use(self.group_id)]

    def steps(self) -> list[str]:
        steps = []
        for mount, members in self.mounts.items():
            for member in members:
                steps.append(
                    f"create a volume from {member.snapshot_id} ({mount} member {member.raid_index}; "
                    f"{self.fast_restore_note(member.snapshot_id)}) and attach it to "
                    f"{self.instance_id} ({self.to_host})"
                )
            if len(members) > 1:
                steps.append(
                    f"on {self.to_host}: assemble the {self.raid_levels[mount]} array from the "
                    f"{plural(len(members), 'member')} in order"
                )
            steps.append(f"on {self.to_host}: mount it at {self.target_path(mount)} (read-write)")
        if self.postgres:
            pg = self.postgres
            steps.append(
                f"on {self.to_host}: in {pg.data_directory} remove postmaster.pid, standby.signal and "
                "recovery.signal (the copy ends recovery on its own and never follows the cluster)"
                + (", and point pg_wal at the restored WAL mount" if len(self.mounts) > 1 else "")
            )
            if self.recovery:
                recovery = self.recovery
                steps.append(
                    f"on {self.to_host}: write the group's backup_label (replay starts at its checkpoint; consistent "
                    f"at {recovery.mark.end}) and recovery.signal"
                )
                steps.append(
                    f"on {self.to_host}: write {recovery.config_file} (pgBackRest, stanza {recovery.stanza}: the "
                    "archive, read only)"
                )
                steps.append(
                    f"on {self.to_host}: start Postgres on it, socket only in {pg.run_directory}, port {pg.port}, "
                    f"archiving off; restore_command fetches {recovery.cluster}'s archived WAL, replayed to "
                    f"{recovery.target.describe()}"
                )
                steps.append(
                    f"on {self.to_host}: wait until it has reached the target and promoted; report the point reached "
                    "and the WAL replayed"
                )
            else:
                steps.append(
                    f"on {self.to_host}: start Postgres on it, socket only in {pg.run_directory}, port {pg.port}, "
                    "archiving off; it replays its WAL to the moment of the freeze"
                )
        steps.append(
            "if any step fails: stop what was started, unmount whatever is mounted from the volumes made "
            "(and stop their array), detach and delete them"
        )
        if self.warm:
            # A warming that fails leaves the restored copy as it is: it is only slower.
            steps += [f"then warm the copy: {step}" for step in self.warm.steps()]
        return steps


@dataclass
class RestoreResult:
    group_id: str
    to_host: str
    volumes: dict[str, str] = field(default_factory=dict)  # snapshot id -> new volume id
    mounted: dict[str, str] = field(default_factory=dict)  # original mount -> where it is now mounted
    postgres: dict[str, Any] | None = None  # data_directory, socket_directory, port, log, psql
    reached: dict[str, Any] | None = None  # a point-in-time restore's: the point, the WAL replayed
    fast_restore: dict[str, bool] | None = None  # as planned: see RestorePlan.fast_restore
    warmed: dict[str, Any] | None = None  # --warm-from: pages and bytes warmed, or the error


def plan_restore(
    fleet: Fleet,
    ebs: Ebs,
    group_id: str,
    to_host: str,
    mount_root: str | None = None,
    port: int = DEFAULT_PORT,
    target: RecoveryTarget | None = None,
) -> RestorePlan:
    from igops.ebs import tags_of

    group = find_group(ebs, group_id)
    refuse_a_primary(fleet, to_host)
    if group.state != STATE_COMPLETE:
        raise RefusedError(f"group {group_id} is {group.state}, not complete", "restore a complete group")
    host = fleet.host(to_host)
    if not host.instance_id:
        raise UsageError(f"host {host.name} has no instance_id", "add it to the inventory")
    refuse_second_restore(ebs, group_id, host)
    mounts: dict[str, list[RestoreVolume]] = defaultdict(list)
    levels: dict[str, str] = {}
    role = None
    for snapshot in group.snapshots:
        tags = tags_of(snapshot)
        role = tags.get(TAG_ROLE, role)
        mounts[tags[TAG_MOUNT]].append(
            RestoreVolume(
                snapshot["SnapshotId"], tags[TAG_MOUNT], int(tags.get(TAG_RAID_INDEX, 0)), tags.get(TAG_FSTYPE, "xfs")
            )
        )
        levels[tags[TAG_MOUNT]] = tags.get(TAG_RAID_LEVEL, "none")
    for members in mounts.values():
        members.sort(key=lambda member: member.raid_index)
    plan = RestorePlan(
        group_id,
        group.host,
        host.name,
        host.instance_id,
        mount_root or fleet.model.snapshot.restore_root,
        dict(mounts),
        levels,
        None,
    )
    plan.fast_restore = ebs.fast_restores(
        [snapshot["SnapshotId"] for snapshot in group.snapshots], ebs.availability_zone(host.instance_id)
    )
    if role == "postgres":
        plan.postgres = postgres_start(fleet, group_id, group.host, {m: plan.target_path(m) for m in mounts}, port)
    if target is not None:
        if plan.postgres is None or group.wal is None:
            raise RefusedError(
                f"group {group_id} records no WAL position: it restores to its own instant only",
                "restore it without a target, or pick a group of a member taken with [archive] set",
            )
        choose_group([group], group.wal.cluster, target)  # refuses a target before the group is consistent
        plan.recovery = Recovery(
            group.wal.cluster,
            archive.stanza(fleet, group.wal.cluster),
            target,
            group.wal,
            f"{plan.postgres.run_directory}/pgbackrest.conf",
        )
        plan.postgres.settings = plan.recovery.settings()
    return plan


def plan_point_in_time(
    fleet: Fleet,
    ebs: Ebs,
    source: str,
    target: RecoveryTarget,
    to_host: str,
    mount_root: str | None = None,
    port: int = DEFAULT_PORT,
) -> RestorePlan:
    """A restore of `source` (a member, or its cluster) to `target`, from the newest group that
    can reach it; refused when the archive does not reach it."""
    from igops.pg import archive_status

    cluster = source if source in fleet.model.postgres.clusters else snapshot_wal.cluster_of(fleet, source)
    if cluster is None:
        raise UsageError(
            f"{source} is neither a Postgres cluster nor a member of one",
            "name a cluster or one of its members (igops pg status lists them)",
        )
    group = choose_group(groups(ebs), cluster, target)
    if target.kind == TIME:
        archiver = archive_status.archiver_stats(fleet, cluster)[1]
        until = datetime.fromisoformat(archiver.last_archived_time) if archiver.last_archived_time else None
        refuse_past_archive(target, until, archiver.last_archived_wal)
    return plan_restore(fleet, ebs, group.group_id, to_host, mount_root, port, target)


def warm_from(fleet: Fleet, plan: RestorePlan, source: str) -> RestorePlan:
    """The plan, warming the restored copy from `source`'s page cache once it runs (a member of
    the cluster restored: the same files are hot)."""
    from igops import vmtouch

    cluster = plan.recovery.cluster if plan.recovery else snapshot_wal.cluster_of(fleet, plan.source_host)
    if plan.postgres is None or cluster is None:
        raise UsageError(
            f"group {plan.group_id} holds no Postgres member's data: --warm-from has nothing to warm",
            "leave out --warm-from, or warm the host's mounts with `igops warm copy` after the restore",
        )
    plan.warm = vmtouch.plan_copy_onto_restored(
        fleet, source, plan.to_host, cluster, plan.postgres.data_directory, vmtouch.WarmOptions()
    )
    return plan


def refuse_a_primary(fleet: Fleet, host_name: str) -> None:
    """A restore never lands on a host that runs a primary: its mounts and its server are the
    cluster's."""
    from igops import postgres_admin

    cluster = snapshot_wal.cluster_of(fleet, host_name)
    if cluster is None:
        return
    try:
        primary = postgres_admin.primary_of(fleet, cluster).name
    except IgopsError:
        return  # no member accepts writes: none runs a primary
    if primary == host_name:
        raise RefusedError(
            f"{host_name} runs the primary of {cluster}: a restore never lands on it",
            "restore onto a scratch host or a standby (igops pg status shows which is which)",
        )


def restored_volumes(ebs: Ebs, group_id: str, host: Host) -> list[dict[str, Any]]:
    """The volumes a restore of this group made for this host (tagged so, or attached to it);
    never those an in-place rebuild made, which are the host's own now."""
    from igops.ebs import tags_of

    return [
        volume
        for volume in ebs.volumes({TAG_GROUP: group_id})
        if TAG_REBUILDS not in tags_of(volume)
        and (
            tags_of(volume).get(TAG_RESTORED_TO) == host.name
            or any(item.get("InstanceId") == host.instance_id for item in volume.get("Attachments") or [])
        )
    ]


def refuse_second_restore(ebs: Ebs, group_id: str, host: Host) -> None:
    existing = restored_volumes(ebs, group_id, host)
    if existing:
        raise RefusedError(
            f"group {group_id} is already restored onto {host.name} "
            f"(volumes {', '.join(volume['VolumeId'] for volume in existing)})",
            f"remove it first: igops snapshot restore {group_id} --onto {host.name} --cleanup",
        )


def restore(fleet: Fleet, ebs: Ebs, plan: RestorePlan, reporter: Reporter = Reporter()) -> RestoreResult:
    host = fleet.host(plan.to_host)
    refuse_second_restore(ebs, plan.group_id, host)  # again, under the lock
    check_readable(ebs, plan.group_id)
    zone = ebs.availability_zone(plan.instance_id)
    result = RestoreResult(plan.group_id, plan.to_host, fast_restore=plan.fast_restore)
    try:
        for mount, members in plan.mounts.items():
            devices = []
            path = plan.target_path(mount)
            for member in members:
                with reporter.step(f"volume from {member.snapshot_id} ({mount} #{member.raid_index})") as step:
                    volume_id = ebs.create_volume(
                        member.snapshot_id,
                        zone,
                        {
                            TAG_GROUP: plan.group_id,
                            TAG_MOUNT: mount,
                            TAG_RAID_INDEX: str(member.raid_index),
                            TAG_HOST: plan.source_host,
                            TAG_RESTORED_TO: plan.to_host,
                            "Name": f"restore {plan.group_id} {mount}#{member.raid_index}",
                        },
                    )
                    result.volumes[member.snapshot_id] = volume_id
                    devices.append(ebs.attach(volume_id, plan.instance_id))
                    step.detail = f"{volume_id} at {devices[-1]}; {plan.fast_restore_note(member.snapshot_id)}"
            with reporter.step(f"mount {mount} at {plan.to_host}:{path}"):
                host_script(
                    fleet,
                    host,
                    mount_script(devices, path, members[0].fstype, f"{plan.group_id}{mount}"),
                    f"mounting {mount}",
                )
                result.mounted[mount] = path
                # Where it went: the cleanup finds the data directory by it and removes the mount
                # point. What it unmounts it finds by device, so a tag that never came is no harm.
                ebs.tag([result.volumes[member.snapshot_id] for member in members], {TAG_RESTORED_AT: path})
        if plan.postgres:
            pg = plan.postgres
            with reporter.step(f"prepare {pg.data_directory}"):
                host_script(fleet, host, prepare_script(pg), "preparing the restored data directory")
            if plan.recovery:
                _recovery_files(fleet, host, plan.recovery, pg, reporter)
            with reporter.step(f"start Postgres on {plan.to_host}, port {pg.port} (socket {pg.run_directory})") as step:
                host_script(fleet, host, start_script(pg), "starting the restored Postgres", timeout=330)
                result.postgres = {
                    "data_directory": pg.data_directory,
                    "socket_directory": pg.run_directory,
                    "port": pg.port,
                    "log": pg.log,
                    "psql": pg.psql,
                }
                step.detail = f"connect: {pg.psql}"
            if plan.recovery:
                result.reached = _await_target(fleet, host, plan.recovery, pg, reporter)
    except BaseException as failure:
        with reporter.step("undo: stop, unmount, detach and delete what this restore made") as step:
            leftovers = _take_away(fleet, ebs, host, plan.group_id)
            if leftovers:
                step.status, step.detail = "failed", "; ".join(leftovers)[:300]
        if isinstance(failure, IgopsError) and not leftovers:
            failure.hint = "nothing is left on the host: the volumes this restore made were detached and deleted"
        elif isinstance(failure, IgopsError):
            failure.hint = f"the undo left: {'; '.join(leftovers)}"
        raise
    if plan.warm:
        result.warmed = _warm(fleet, plan.warm, reporter)
    return result


def _warm(fleet: Fleet, plan: WarmPlan, reporter: Reporter) -> dict[str, Any]:
    """Copy the member's page cache onto the copy; a failure is reported, the copy stays."""
    from igops import vmtouch

    try:
        warmed = vmtouch.copy(fleet, plan, reporter)
    except IgopsError as exc:
        return {"from": plan.source, "error": exc.one_line()}
    return {
        "from": plan.source,
        "warmed_pages": warmed.warmed_pages,
        "warmed_bytes": warmed.warmed_bytes,
        "hit_ratio": warmed.hit_ratio,
        "skipped_files": warmed.skipped_files,
        "seconds": warmed.seconds,
    }


def _recovery_files(fleet: Fleet, host: Host, recovery: Recovery, pg: PostgresStart, reporter: Reporter) -> None:
    with reporter.step(f"backup_label and recovery.signal in {pg.data_directory}"):
        host_script(
            fleet, host, recovery_files_script(recovery, pg.data_directory, pg.os_user), "writing the recovery files"
        )
    with reporter.step(f"write {recovery.config_file}"):
        config = archive.render_restore_config(fleet, recovery.cluster, pg.data_directory, pg.run_directory, pg.port)
        data = config.encode()
        host_script(
            fleet,
            host,
            _WRITE_PRIVATE_FILE.format(
                run=shlex.quote(pg.run_directory),
                file=shlex.quote(recovery.config_file),
                user=shlex.quote(pg.os_user),
                size=len(data),
            ),
            f"writing {recovery.config_file}",
            stdin=data,
        )


# The run directory is the restored server's own (0700); the file holds the repository's S3 secret,
# so it is never readable by others, not even for a moment (umask first), and comes on stdin.
_WRITE_PRIVATE_FILE = (
    "set -e; umask 077; mkdir -p {run}; chown {user} {run}; chmod 0700 {run}; size={size}; "
    + stdin_into("{file}")
    + "; chown {user} {file}"
)


def _await_target(
    fleet: Fleet, host: Host, recovery: Recovery, pg: PostgresStart, reporter: Reporter
) -> dict[str, Any]:
    with reporter.step(f"replay to {recovery.target.describe()}, then promote") as step:
        host_script(
            fleet,
            host,
            promoted_script(pg.psql, pg.status, pg.log, RECOVERY_TIMEOUT_S),
            "recovering to the target",
            timeout=RECOVERY_TIMEOUT_S + 30,
        )
        [target] = remote.targets_for(fleet, [host])
        [log] = remote.run([target], f"cat {shlex.quote(pg.log)}", remote.settings_for(fleet), timeout=60)
        reached = reached_from_log(log.stdout)
        replayed = replayed_bytes(recovery.mark, reached)
        step.detail = (
            f"reached {reached.redo_done or '?'}"
            + (f", last transaction at {reached.last_transaction}" if reached.last_transaction else "")
            + (f"; {plural(replayed // (1 << 20), 'MiB')} of WAL replayed" if replayed is not None else "")
        )
    return {
        "target": recovery.target.describe(),
        "group_consistent_at": recovery.mark.end,
        "redo_done": reached.redo_done,
        "last_transaction": reached.last_transaction,
        "stopped": reached.stopped,
        "replayed_bytes": replayed,
    }


# How long a restored copy may take to replay the archive to its target: a day's WAL at a few
# hundred MB/s fits.
RECOVERY_TIMEOUT_S = 3600


@dataclass
class CleanupPlan:
    group_id: str
    to_host: str
    volumes: list[str]
    devices: list[str]  # where the volumes are attached to the host: what is unmounted is found by them
    mounted: list[str]  # where the restore mounted them (tagged once mounted)
    data_directory: str | None
    run_directory: str
    restore_root: str

    def steps(self) -> list[str]:
        steps = []
        if self.data_directory:
            steps.append(f"on {self.to_host}: stop the restored Postgres on {self.data_directory} (if running)")
        if self.devices:
            steps.append(
                f"on {self.to_host}: unmount every filesystem on {', '.join(self.devices)} or on an md array "
                "over them, wherever it is mounted, and stop those arrays; a mount of any other device stays"
            )
            steps.append(f"on {self.to_host}: refuse to go on while anything still holds one of those devices")
        steps += [f"detach and delete volume {volume_id}" for volume_id in self.volumes]
        tagged = f" and {', '.join(self.mounted)} (where the restore mounted)" if self.mounted else ""
        steps.append(
            f"on {self.to_host}: remove {self.run_directory}; remove, if empty, each mount point just emptied"
            f"{tagged}, with its empty parents below {self.restore_root}"
        )
        return steps


def attached_devices(volumes: list[dict[str, Any]], instance_id: str | None) -> list[str]:
    """Where the volumes are attached to the instance, as EC2 names the devices, in order."""
    devices = []
    for volume in volumes:
        for attachment in volume.get("Attachments") or []:
            device = attachment.get("Device")
            if instance_id and attachment.get("InstanceId") == instance_id and device and device not in devices:
                devices.append(device)
    return devices


def plan_cleanup(fleet: Fleet, ebs: Ebs, group_id: str, to_host: str) -> CleanupPlan:
    from igops.ebs import tags_of

    host = fleet.host(to_host)
    volumes = restored_volumes(ebs, group_id, host)
    if not volumes:
        raise UsageError(f"group {group_id} is not restored onto {host.name}", "see `igops snapshot list`")
    mounted = _restored_mounts(volumes)
    source = next((tags_of(volume).get(TAG_HOST) for volume in volumes if tags_of(volume).get(TAG_HOST)), None)
    run_directory = f"{fleet.model.snapshot.restore_root.rstrip('/')}/{group_id}.postgres"
    data_directory = None
    if source in fleet.hosts_by_name:
        try:
            data_directory = postgres_start(fleet, group_id, source, mounted, DEFAULT_PORT).data_directory
        except IgopsError:
            data_directory = None  # not a Postgres group
    return CleanupPlan(
        group_id,
        host.name,
        [volume["VolumeId"] for volume in volumes],
        attached_devices(volumes, host.instance_id),
        sorted(set(mounted.values())),
        data_directory,
        run_directory,
        fleet.model.snapshot.restore_root,
    )


def cleanup(fleet: Fleet, ebs: Ebs, plan: CleanupPlan, reporter: Reporter = Reporter()) -> list[str]:
    with reporter.step(f"take away the restore of {plan.group_id} from {plan.to_host}") as step:
        leftovers = _take_away(fleet, ebs, fleet.host(plan.to_host), plan.group_id)
        if leftovers:
            raise RemoteError(
                f"the cleanup of {plan.group_id} on {plan.to_host} left: {'; '.join(leftovers)}",
                "fix what is named and run the cleanup again",
            )
        step.detail = f"{plural(len(plan.volumes), 'volume')} deleted"
    return plan.volumes


def _restored_mounts(volumes: list[dict[str, Any]]) -> dict[str, str]:
    from igops.ebs import tags_of

    return {
        tags_of(volume)[TAG_MOUNT]: tags_of(volume)[TAG_RESTORED_AT]
        for volume in volumes
        if tags_of(volume).get(TAG_MOUNT) and tags_of(volume).get(TAG_RESTORED_AT)
    }


def _take_away(fleet: Fleet, ebs: Ebs, host: Host, group_id: str) -> list[str]:
    """Stop, unmount, detach and delete everything a restore of the group onto the host made,
    as far as it got: every filesystem on its volumes' devices is unmounted (and their arrays
    stopped) before any volume is detached. Returns what could not be taken away."""
    leftovers = []
    try:
        plan = plan_cleanup(fleet, ebs, group_id, host.name)
    except UsageError:
        return []  # no volume was made
    except IgopsError as exc:
        return [f"cannot find the restore's volumes: {exc.one_line()}"]
    script = teardown_script(
        plan.data_directory, plan.run_directory, plan.devices, plan.mounted, plan.restore_root, fleet.model.postgres
    )
    try:
        host_script(fleet, host, script, "unmounting the restore", timeout=120)
    except IgopsError as exc:
        # Volumes still mounted must not be detached under the filesystem.
        return [exc.one_line(), f"volumes {', '.join(plan.volumes)} still attached"]
    for volume_id in plan.volumes:
        try:
            ebs.detach(volume_id)
            ebs.delete_volume(volume_id)
        except IgopsError as exc:
            leftovers.append(f"{volume_id}: {exc.one_line()}")
    return leftovers
