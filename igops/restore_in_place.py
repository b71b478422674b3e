"""`igops snapshot restore SOURCE --onto STANDBY --in-place`: rebuild a standby from a snapshot
group instead of cloning it from the primary. The standby stops; the volumes under the group's
mounts come out (kept, detached, tagged `igops:replaced-by`); volumes made from the group go in
at the same mount points (fstab follows); the data becomes a standby's again (standby.signal,
the group's backup_label, restore_command from the archive) and follows the primary.

It is a Postgres plan (igops.pg): it runs under the cluster's lease and the group's (`resources`),
journals every step, and an abort puts the old volumes back and starts the standby on them. Its steps are
igops.pg.rebuild_actions'. A rerun after a killed run plans from what it finds: mounts already
rebuilt from the group are left as they are, and the volumes the killed run took out (found by
their tags) are the rerun's to put back if it fails, as they were the killed run's: the rerun
supersedes it (igops.operations.engine), so no abort of the killed run is left to do that.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from igops import snapshot_wal
from igops.errors import RefusedError, UsageError
from igops.operations import conflicts
from igops.operations.steps import Step
from igops.output import Reporter
from igops.pg.cluster import PgClusterState, cluster_members, pg_view
from igops.pg.failover_plans import sole_primary
from igops.pg.plan_steps import with_repmgrd_paused
from igops.pg.plans import PgPlan, signed
from igops.pg.rebuild_actions import (
    REPLACED_SUFFIX,
    TAG_REPLACED_AT,
    TAG_REPLACED_BY,
    TAG_REPLACED_ON,
    made_for,
    mounted_volumes,
)
from igops.restore_target import LATEST, RecoveryTarget, choose_group
from igops.role_change import Refused
from igops.snapshot_groups import (
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
    # mount -> the volume a rebuild from this group last took out of it, kept (older ones, from
    # rebuilds that ended, may carry the same tags: db2 rebuilt from one group, another, then it)
    earlier: dict[str, dict[str, Any]] = {}
    for mount in mounts:
        taken = ebs.volumes({TAG_REPLACED_ON: f"{node}:{mount}"})
        _refuse_if_another_group_unfinished(node, mount, group.group_id, taken, present.get(mount))
        last = _last_taken_out([v for v in taken if tags_of(v).get(TAG_REPLACED_BY) == group.group_id])
        if last is not None:
            earlier[mount] = last
        elif mount not in present:
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
    # (mount, snapshot, volume) an earlier run took out (unmounted at least): this run's to put back
    taken_out: list[tuple[str, str, str]] = []
    for mount, snapshot_id in mounts.items():
        made = {volume["VolumeId"] for volume in made_for(ebs, group.group_id, node, mount)}
        current = present.get(mount)
        previous = earlier.get(mount)
        if previous is not None:
            replaced[mount] = previous["VolumeId"]
            if current is None or current in made:
                taken_out.append((mount, snapshot_id, previous["VolumeId"]))
            if current is None and any(
                attachment.get("InstanceId") == host.instance_id for attachment in previous.get("Attachments") or []
            ):
                # A run cut off between its unmount and its detach: detached below, and put back
                # by the take-over's undo too, should this run stop before that step.
                current = previous["VolumeId"]
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
    if all(mount in earlier and _renamed(earlier[mount]) for mount in mounts):
        # Every mount's volume taken out is named '(replaced)': an earlier run got to its last
        # step (the tags), and the rebuild is done. Run again, it sees only to what follows the swaps.
        taken_out = []
    take_over = _take_over_step(node, group.group_id, taken_out) if taken_out else None
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
        # The start has no undo: after a run that got to its end, a failure of this one leaves
        # the member running where it is; with volumes to put back, the take-over's undo stops it.
        plan.settling = node
        steps += [*remounted, start, *catch_up]
    else:
        if member.state != "stopped":
            steps.append(
                Step(
                    f"{node}: stop (repmgr node service --action=stop)",
                    "stop",
                    (node,),
                    # With volumes to put back, the take-over's undo starts it, once they are back.
                    undo=None if take_over else Step(f"{node}: start it again", "start_standby", (node,)),
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
    if take_over:
        # First: its undo runs last of all (after the new volumes' discard, before repmgrd's
        # unpause), and a kill at any of this run's steps leaves it journaled for `ops abort`.
        plan.actions.insert(0, take_over)
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


def _take_over_step(node: str, group_id: str, taken_out: list[tuple[str, str, str]]) -> Step:
    """The volumes an earlier run took out (it was killed, or failed and could not put them
    back), made this run's: its undo, or `igops ops abort` of it, puts them back at their mounts
    (the volumes made for those mounts unmounted and deleted first) and starts the member on them,
    as the earlier run's own would have."""
    volumes = ", ".join(f"{old} ({mount})" for mount, _, old in taken_out)
    return Step(
        f"{node}: {volumes}, taken out by an earlier run from {group_id}, kept: this run puts them back if it fails",
        "keep_taken_out",
        (node, group_id, tuple(taken_out)),
        undo=Step(
            f"{node}: stop it if it runs, unmount and delete the volumes made for "
            f"{', '.join(mount for mount, _, _ in taken_out)}, attach {volumes} again and mount them, "
            f"start {node} on them",
            "put_back_taken_out",
            (node, group_id, tuple(taken_out)),
        ),
    )


def _renamed(volume: dict[str, Any]) -> bool:
    """Whether a volume a rebuild took out was renamed '(replaced)', as the rebuild's last steps
    do (adopt_tags): a rebuild that did so for every mount got to its end."""
    from igops.ebs import tags_of

    return tags_of(volume).get("Name", "").endswith(REPLACED_SUFFIX)


def _last_taken_out(volumes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Of the volumes taken out of one mount, the one taken out last (by igops:replaced-at)."""
    from igops.ebs import tags_of

    return max(volumes, key=lambda volume: tags_of(volume).get(TAG_REPLACED_AT, ""), default=None)


def _refuse_if_another_group_unfinished(
    node: str, mount: str, group_id: str, taken: list[dict[str, Any]], mounted: str | None
) -> None:
    """A rebuild from another group that took a volume out of this mount and did not get to its
    end is the one to finish or undo first: this one would take out the volume it put in, and
    leave the one it took out with nothing to put it back."""
    from igops.ebs import tags_of

    for volume in taken:
        other = tags_of(volume).get(TAG_REPLACED_BY)
        if other and other != group_id and volume["VolumeId"] != mounted and not _renamed(volume):
            raise RefusedError(
                f"a rebuild of {node} from group {other} took {volume['VolumeId']} out of {mount} and did not "
                "get to its end",
                f"finish it first (igops snapshot restore {other} --onto {node} --in-place --yes), or abort it "
                "if igops ops list shows it interrupted",
            )


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
