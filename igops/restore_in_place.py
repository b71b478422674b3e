"""`igops snapshot restore SOURCE --onto STANDBY --in-place`: rebuild a standby from a snapshot
group instead of cloning it from the primary. The standby stops; the volumes under the group's
mounts come out (kept, detached, tagged `igops:replaced-by`); volumes made from the group go in
at the same mount points (fstab follows); the data becomes a standby's again (standby.signal,
the group's backup_label, restore_command from the archive) and follows the primary.

It is a Postgres plan (igops.pg): it runs under the cluster's lease and the group's (`resources`),
journals every step, and an abort puts the old volumes back and starts the standby on them. Its steps are
igops.pg.rebuild_actions'. A rerun after a killed run plans from what it finds: mounts already
rebuilt from the group are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from igops import snapshot_wal
from igops.errors import RefusedError, UsageError
from igops.operations import conflicts
from igops.operations.steps import Step
from igops.output import Reporter
from igops.pg.cluster import PgClusterState, cluster_members, pg_view
from igops.pg.failover_plans import sole_primary
from igops.pg.plan_steps import with_repmgrd_paused
from igops.pg.plans import PgPlan, signed
from igops.pg.rebuild_actions import TAG_REPLACED_BY, TAG_REPLACED_ON, made_for, mounted_volumes
from igops.restore_target import LATEST, RecoveryTarget, choose_group
from igops.role_change import Refused
from igops.snapshot import (
    STATE_COMPLETE,
    TAG_MOUNT,
    TAG_RAID_INDEX,
    TAG_RAID_LEVEL,
    SnapshotGroup,
    check_readable,
    find_group,
    groups,
    in_use,
)

if TYPE_CHECKING:
    from igops.ebs import Ebs
    from igops.inventory import Fleet
    from igops.inventory_model import Host
    from igops.pg.actions import PgResult


@dataclass
class RebuildPlan(PgPlan):
    """A Postgres plan that rebuilds a standby: it names the group it rebuilds from."""

    group: str = field(kw_only=True)  # the snapshot group's id


def plan_rebuild(fleet: Fleet, ebs: Ebs, source: str, node: str) -> tuple[RebuildPlan, PgClusterState]:
    """The plan that rebuilds standby `node` from `source` (a group id, or its cluster or a
    member: the newest complete group of the cluster)."""
    from igops.ebs import tags_of

    cluster = snapshot_wal.cluster_of(fleet, node)
    if cluster is None:
        raise UsageError(
            f"{node} is not a member of a Postgres cluster: --in-place rebuilds a standby",
            "restore onto it without --in-place (a copy beside what it runs)",
        )
    view = pg_view(fleet, cluster)
    state = view.state
    assert state is not None  # pg_view reports every view it makes
    member = state.node(node)
    if node in view.writable() or member.role == "primary":
        raise Refused(
            state,
            f"refused: {node} runs the primary of {cluster}: a restore never lands on it",
            f"switch over first (igops pg switchover {cluster} --to ANOTHER), then rebuild {node} as a standby",
        )
    if member.state == "host unreachable":
        raise Refused(state, f"refused: {node} does not answer over SSH", "a rebuild in place needs the host")
    primary = sole_primary(view, node, "a standby is rebuilt in")
    group = _group(ebs, source, cluster, fleet, node)
    host = fleet.host(node)
    mounts: dict[str, str] = {}  # mount -> the group's snapshot of it
    for snapshot in group.snapshots:
        tags = tags_of(snapshot)
        if tags.get(TAG_RAID_LEVEL, "none") != "none" or int(tags.get(TAG_RAID_INDEX, 0)):
            raise RefusedError(
                f"group {group.group_id} holds a RAID array ({tags[TAG_MOUNT]}): a rebuild in place swaps one "
                "volume per mount",
                f"restore it onto a scratch host, or rebuild {node} with `igops pg rejoin`",
            )
        mounts[tags[TAG_MOUNT]] = snapshot["SnapshotId"]
    listed = sorted(mount.path for mount in host.mounts if mount.volumes and mount.path in mounts)
    if listed:
        raise RefusedError(
            f"the inventory lists {node}'s volumes for {', '.join(listed)}: a rebuild would leave that list naming "
            "volumes no longer there",
            "remove the mount's volumes list from the inventory (igops then finds them itself), then rebuild",
        )
    present = mounted_volumes(fleet, ebs, host, list(mounts))
    for mount in mounts:
        if mount not in present and not ebs.volumes(
            {TAG_REPLACED_BY: group.group_id, TAG_REPLACED_ON: f"{node}:{mount}"}
        ):
            raise RefusedError(
                f"group {group.group_id} holds {mount} of {group.host}, which is no mount point on {node}",
                f"rebuild {node} from a group taken on it, or one of a member whose mounts are where {node}'s are",
            )
    plan = RebuildPlan(
        "rebuild",
        cluster,
        f"Rebuild {node} in place from group {group.group_id}, as a standby of {primary}",
        primary,
        primary,
        failure_hint=f"`igops ops abort` puts {node}'s old volumes back; see `igops pg status {cluster}`",
        group=group.group_id,
    )
    swaps: list[Step] = []
    remounted: list[Step] = []  # mounts an earlier run rebuilt: their fstab entries, again
    replaced: dict[str, str] = {}  # mount -> the volume taken out of it
    for mount, snapshot_id in mounts.items():
        made = {volume["VolumeId"] for volume in made_for(ebs, group.group_id, node, mount)}
        earlier = ebs.volumes({TAG_REPLACED_BY: group.group_id, TAG_REPLACED_ON: f"{node}:{mount}"})
        current = present.get(mount)
        if earlier:
            replaced[mount] = earlier[0]["VolumeId"]
            if current is None and any(
                attachment.get("InstanceId") == host.instance_id for attachment in earlier[0].get("Attachments") or []
            ):
                current = earlier[0]["VolumeId"]  # a run cut off between its unmount and its detach
        if current and current in made:
            # Rebuilt by an earlier run, which may have been cut off before its fstab entry:
            # the step mounts nothing then, and points the entry at what is mounted.
            remounted.append(
                _mount_step(fleet, host, group.group_id, mount, snapshot_id, f"{mount} holds its new volume already")
            )
            continue
        swaps += _swap_steps(fleet, host, group.group_id, mount, snapshot_id, current)
        if current:
            replaced[mount] = current
    steps: list[Step] = []
    catch_up = [
        Step(
            f"{node}: follow {primary} (on its own if its primary_conninfo names it, else repmgr standby follow)",
            "follow_primary",
            (node, primary),
        ),
        Step(f"{node}: wait until it streams from {primary}", "wait_streaming", (node, primary)),
    ]
    if fleet.model.archive is not None:
        catch_up.append(
            Step(
                f"{node}: put back the restore_command its data had, or none (the archive's was for the "
                "catch-up), reload",
                "put_back_restore_command",
                (node,),
            )
        )
    start = Step(
        f"{node}: start it (repmgr node service --action=start); it replays from its last restartpoint",
        "start_standby",
        (node,),
    )
    if not swaps and member.state in ("running", "starting or stopping"):
        # On the group's volumes already, and started (a run cut off after its start, run again):
        # it is waited for, not stopped and started again. Each step does nothing once done, so
        # the plan is the same whether it answers or streams yet, and the member is left out of
        # the signature: its catch-up going on between this plan and its run makes it no staler.
        # The start has no undo here: the swaps it would make way for are an earlier run's, and an
        # abort of this one leaves the member running where it is.
        plan.settling = node
        steps += [*remounted, start, *catch_up]
    else:
        if member.state != "stopped":
            steps.append(
                Step(
                    f"{node}: stop (repmgr node service --action=stop)",
                    "stop",
                    (node,),
                    undo=Step(f"{node}: start it again", "start_standby", (node,)),
                )
            )
        steps.append(Step(f"{node}: wait until its postmaster is gone", "wait_stopped", (node,)))
        steps += remounted + swaps
        steps += [
            Step(
                f"{node}: make the data a standby's: remove postmaster.pid and recovery.signal, write standby.signal"
                + (" and restore_command (the archive's WAL)" if fleet.model.archive is not None else ""),
                "prepare_rebuilt",
                (node, group.group_id),
            ),
            replace(start, undo=Step(f"{node}: stop it, so that the volumes under it can go", "stop_rebuilt", (node,))),
            *catch_up,
        ]
    steps += [
        Step(
            f"the volume made for {mount} takes {old}'s tags; {old} stays detached, named '(replaced)'",
            "adopt_tags",
            (node, mount, old, group.group_id),
        )
        for mount, old in replaced.items()
    ]
    plan.actions = with_repmgrd_paused(steps, primary, tuple(cluster_members(fleet, cluster)))
    plan.notes.append(
        f"the volumes taken out ({', '.join(replaced.values()) or 'none'}) are kept, detached: delete them "
        "once the rebuilt standby has served a while (aws ec2 delete-volume)"
    )
    return signed(plan, view), state


def resources(plan: RebuildPlan) -> list[conflicts.Resource]:
    """The cluster's lease, as every Postgres plan's, and the group's: no prune or delete takes it
    while the rebuild reads it (its snapshots, then the archived WAL from its start)."""
    return [conflicts.pg_cluster(plan.cluster), in_use(plan.group)]


def apply(fleet: Fleet, plan: RebuildPlan, reporter: Reporter = Reporter()) -> PgResult:
    """Run the rebuild under its leases (`resources`): refused first if a volume is still to be
    made from a group no longer there whole (a prune or delete between the plan and the lease).
    A rerun whose volumes were all made needs the group no more."""
    from igops import failover
    from igops.ebs import Ebs

    if any(step.action == "volume_from_group" for step in plan.actions):
        check_readable(Ebs(fleet), plan.group)
    return failover.apply_pg(fleet, plan, reporter)


def _swap_steps(
    fleet: Fleet, host: Host, group_id: str, mount: str, snapshot_id: str, current: str | None
) -> list[Step]:
    """Take out what is mounted at `mount` (if anything), put in a volume made from the group."""
    node = host.name
    args = (node, mount, snapshot_id, group_id)
    steps = []
    if current:
        steps.append(
            Step(
                f"{node}: unmount {mount} and detach {current} (kept, tagged {TAG_REPLACED_BY}={group_id})",
                "swap_out",
                (node, mount, current, group_id),
                undo=Step(
                    f"{node}: attach {current} again and mount it at {mount}",
                    "swap_back",
                    (node, mount, current, group_id),
                ),
            )
        )
    steps += [
        Step(
            f"create a volume from {snapshot_id} and attach it to {host.instance_id} ({node})",
            "volume_from_group",
            args,
            undo=Step(
                f"{node}: unmount, detach and delete the volume made from {snapshot_id}", "discard_rebuilt", args
            ),
        ),
        _mount_step(fleet, host, group_id, mount, snapshot_id, f"mount it at {mount}"),
    ]
    return steps


def _mount_step(fleet: Fleet, host: Host, group_id: str, mount: str, snapshot_id: str, mounting: str) -> Step:
    """Mount the volume made for `mount` unless it is there (`mounting` says which), then point
    fstab's entry at it."""
    fstab = fleet.path_for(fleet.model.snapshot.fstab, host)
    return Step(
        f"{host.name}: {mounting}; point {fstab}'s entry for {mount} at it",
        "mount_rebuilt",
        (host.name, mount, snapshot_id, group_id),
    )


LATEST_TARGET = RecoveryTarget(LATEST)


def _group(ebs: Ebs, source: str, cluster: str, fleet: Fleet, node: str) -> SnapshotGroup:
    if source in fleet.model.postgres.clusters or source in fleet.hosts_by_name:
        wanted = source if source in fleet.model.postgres.clusters else snapshot_wal.cluster_of(fleet, source)
        if wanted != cluster:
            raise UsageError(f"{source} is not {cluster} nor one of its members", f"name {cluster} or a group of it")
        # Its own newest group first: the one whose mounts are surely where its are.
        found = groups(ebs)
        own = [group for group in found if group.host == node]
        return choose_group(
            own if any(g.state == STATE_COMPLETE and g.wal for g in own) else found, cluster, LATEST_TARGET
        )
    group = find_group(ebs, source)
    if group.state != STATE_COMPLETE:
        raise RefusedError(f"group {source} is {group.state}, not complete", "rebuild from a complete group")
    if snapshot_wal.cluster_of(fleet, group.host) != cluster:
        raise RefusedError(
            f"group {source} was taken on {group.host}, which is not a member of {cluster}",
            f"rebuild from a group of {cluster} (igops snapshot list)",
        )
    return group
