"""Consistent EBS snapshots of XFS filesystems: freeze, snapshot every volume at once, thaw.

Compared with the classic per-volume loop, the freeze is held by a watchdog on the host that
thaws even if igops is killed; every volume is snapshotted in one call (or in parallel), so the
freeze window does not grow with the number of volumes; RAID members are found, ordered and
tagged so a restore can reassemble them; and a group with any failed call is marked failed.
"""

from __future__ import annotations

import json
import secrets as random_source
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from igops import __version__, agent, remote, remote_session, snapshot_wal
from igops.errors import IgopsError, RefusedError, RemoteError, UsageError
from igops.output import Reporter, plural
from igops.snapshot_groups import (
    STATE_COMPLETE,
    STATE_FAILED,
    STATE_TAKING,
    TAG_CREATED,
    TAG_DEVICE,
    TAG_FREEZE_MS,
    TAG_FSTYPE,
    TAG_GROUP,
    TAG_GROUP_SIZE,
    TAG_HOST,
    TAG_MOUNT,
    TAG_RAID_INDEX,
    TAG_RAID_LEVEL,
    TAG_RAID_MEMBERS,
    TAG_ROLE,
    TAG_STATE,
    TAG_VERSION,
)
from igops.snapshot_volumes import VolumeTarget, discover, map_volumes

if TYPE_CHECKING:
    from igops.ebs import Ebs
    from igops.inventory import Fleet


@dataclass
class CreatePlan:
    group_id: str
    host: str
    instance_id: str
    role: str
    mounts: list[str]
    volumes: list[VolumeTarget]
    one_call: bool
    freeze_deadline: float
    pre_freeze: str | None
    write_stall: str | None = None  # set when the host is a live primary and freezing it was allowed
    # The Postgres cluster whose WAL the group records its position in (igops.snapshot_wal): set
    # for a member's group when the fleet archives WAL, the only place that WAL can come from.
    wal_cluster: str | None = None
    # The primary whose CHECKPOINT the standby replays before its pg_backup_start ([snapshot]
    # checkpoint_primary): the group's WAL then starts at the group, not checkpoints back.
    checkpoint_on: str | None = None

    def steps(self) -> list[str]:
        steps = [self.write_stall] if self.write_stall else []
        if self.checkpoint_on:
            steps.append(
                f"on {self.checkpoint_on} (the primary): CHECKPOINT, then wait until {self.host} has replayed it "
                f"(at most {snapshot_wal.REPLAY_WAIT_S:g} s, else go on), so that a restore of this group replays "
                "only the WAL written since"
            )
        if self.wal_cluster:
            steps.append(
                f"on {self.host}: pg_backup_start (a restartpoint: where replay of {self.wal_cluster}'s archived WAL "
                "starts for this group)"
            )
        if self.pre_freeze:
            steps.append(f"on {self.host}: run the pre-freeze hook `{self.pre_freeze}`, then sync")
        steps.append(
            f"on {self.host}: start the thaw watchdog (hard deadline {self.freeze_deadline:g} s), "
            f"freeze {', '.join(self.mounts)}"
        )
        if self.one_call:
            steps.append(
                f"CreateSnapshots for instance {self.instance_id} (its {len(self.volumes)} data volumes, "
                "one shared point in time)"
            )
        else:
            steps.append(
                f"{len(self.volumes)} parallel CreateSnapshot calls: "
                + ", ".join(f"{v.volume_id} ({v.mount} {v.device})" for v in self.volumes)
            )
        steps.append(f"thaw {', '.join(reversed(self.mounts))} (reverse order) the moment the calls return")
        if self.wal_cluster:
            steps.append(f"on {self.host}: pg_backup_stop (where the group is consistent, and its backup_label)")
        steps.append(
            f"tag every snapshot with group {self.group_id}, host, role, mount, device, RAID index, "
            "freeze window and igops version"
            + (", WAL range and backup_label" if self.wal_cluster else "")
            + "; mark the group complete; delete any stray snapshot with its tag (one EC2 made for a call "
            "whose answer was lost, or of a volume attached since this plan)"
        )
        return steps


@dataclass
class CreateResult:
    group_id: str
    host: str
    state: str
    snapshots: dict[str, str] = field(default_factory=dict)
    freeze_window_ms: float | None = None
    thawed_by: str | None = None
    error: str | None = None


def new_group_id(host: str, now: datetime | None = None) -> str:
    moment = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{host}-{moment}-{random_source.token_hex(2)}"


# --- create -----------------------------------------------------------------------------------
def plan_create(
    fleet: Fleet,
    host_name: str,
    mounts: list[str] | None = None,
    ebs: Ebs | None = None,
    deadline: float | None = None,
    hook: bool = True,
    allow_primary: bool = False,
) -> CreatePlan:
    """Discover what lies under the mounts and refuse anything unsafe, before anything is frozen."""
    from igops.ebs import MAX_PENDING_SNAPSHOTS, Ebs

    host = fleet.host(host_name)
    freeze_deadline = deadline or fleet.model.snapshot.freeze_deadline
    write_stall, primary = primary_write_stall(fleet, host.name, freeze_deadline, allow_primary)
    if not host.instance_id:
        raise UsageError(f"host {host.name} has no instance_id", 'add instance_id = "i-…" to it in the inventory')
    chosen = mounts or [mount.path for mount in host.mounts]
    if not chosen:
        raise UsageError(
            f"host {host.name} has no data mounts", "pass --mount or list [[hosts.mounts]] in the inventory"
        )
    for path in chosen:
        if path.rstrip("/") == "":
            raise RefusedError("refusing to freeze /", "freeze only data filesystems")
    ebs = ebs or Ebs(fleet)
    discovered = discover(fleet, host, chosen)
    attachments = ebs.instance_volumes(host.instance_id)
    volumes = map_volumes(host, discovered, attachments)
    pending = ebs.pending_snapshots([volume.volume_id for volume in volumes])
    busy = [volume_id for volume_id, count in pending.items() if count >= MAX_PENDING_SNAPSHOTS]
    if busy:
        raise RefusedError(
            f"volumes with {MAX_PENDING_SNAPSHOTS} pending snapshots already: {', '.join(busy)}",
            "wait for those snapshots to complete",
        )
    data_volumes = {item.volume_id for item in attachments if not item.root}
    wal_cluster = snapshot_wal.cluster_of(fleet, host.name) if fleet.model.archive else None
    # A standby's: a primary's own pg_backup_start checkpoints.
    checkpoint_on = (
        primary if wal_cluster and primary != host.name and fleet.model.snapshot.checkpoint_primary else None
    )
    role = next((role for role in host.roles if role != "munin"), host.roles[0] if host.roles else "none")
    pre_freeze = fleet.model.snapshot.pre_freeze.get(role) if hook else None
    return CreatePlan(
        group_id=new_group_id(host.name),
        host=host.name,
        instance_id=host.instance_id,
        role=role,
        mounts=chosen,
        volumes=volumes,
        one_call={volume.volume_id for volume in volumes} == data_volumes,
        freeze_deadline=freeze_deadline,
        pre_freeze=fleet.path_for(pre_freeze, host) if pre_freeze else None,
        write_stall=write_stall,
        wal_cluster=wal_cluster,
        checkpoint_on=checkpoint_on,
    )


def primary_write_stall(
    fleet: Fleet, host_name: str, deadline: float, allow_primary: bool
) -> tuple[str | None, str | None]:
    """Snapshots are taken of standbys: freezing a live primary stalls every write to its
    cluster until the thaw. The primary is found by asking the members (a switchover moves it;
    the inventory keeps naming the members as they were). Refused unless explicitly allowed;
    when allowed, the stall is stated in the plan. Returns that statement, if any, and the
    primary of the host's cluster, if one answers."""
    from igops import postgres_admin

    for cluster_name, cluster in fleet.model.postgres.clusters.items():
        if host_name != cluster.primary and host_name not in cluster.standbys:
            continue
        try:
            primary = str(postgres_admin.primary_of(fleet, cluster_name).name)
        except IgopsError:
            return None, None  # no member accepts writes: freezing stalls none
        if primary != host_name:
            return None, primary
        if not allow_primary:
            standbys = [name for name in (cluster.primary, *cluster.standbys) if name != host_name]
            raise RefusedError(
                f"{host_name} is the live primary of Postgres cluster {cluster_name}: freezing it stalls every "
                f"write to the cluster for up to {deadline:g} s",
                f"snapshot its standby ({', '.join(standbys) or 'none listed'}) instead, "
                "or pass --allow-primary to accept the write stall",
            )
        return (
            f"WRITE STALL: {host_name} is the live primary of Postgres cluster {cluster_name}; every write "
            f"to it waits while the filesystems are frozen (up to {deadline:g} s)"
        ), primary
    return None, None


def create(fleet: Fleet, plan: CreatePlan, reporter: Reporter = Reporter(), ebs: Ebs | None = None) -> CreateResult:
    from igops.ebs import Ebs

    ebs = ebs or Ebs(fleet)
    host = fleet.host(plan.host)
    settings = remote.settings_for(fleet)
    [target] = remote.targets_for(fleet, [host])
    result = CreateResult(plan.group_id, plan.host, STATE_FAILED)
    common = {
        TAG_GROUP: plan.group_id,
        TAG_HOST: plan.host,
        TAG_ROLE: plan.role,
        TAG_GROUP_SIZE: str(len(plan.volumes)),
        TAG_STATE: STATE_TAKING,
        TAG_CREATED: datetime.now(UTC).isoformat(timespec="seconds"),
        TAG_VERSION: __version__,
    }

    backup = snapshot_wal.Backup(fleet, plan.host, plan.wal_cluster, plan.group_id) if plan.wal_cluster else None
    try:
        return _create(fleet, plan, reporter, ebs, target, settings, result, common, backup)
    finally:
        if backup is not None:
            backup.close()  # a backup not stopped ends with its session


def _cause(exc: Exception) -> str:
    """A driver's error or igops' own, in one line."""
    return exc.message if isinstance(exc, IgopsError) else (str(exc).strip().splitlines() or ["?"])[0]


def _create(
    fleet: Fleet,
    plan: CreatePlan,
    reporter: Reporter,
    ebs: Ebs,
    target: remote.Target,
    settings: remote.SshSettings,
    result: CreateResult,
    common: dict[str, str],
    backup: snapshot_wal.Backup | None,
) -> CreateResult:
    if backup is not None and plan.checkpoint_on:
        with reporter.step(f"CHECKPOINT on {plan.checkpoint_on}, replayed on {plan.host}") as step:
            try:
                step.detail = snapshot_wal.fresh_checkpoint(fleet, plan.checkpoint_on, plan.host)
            except Exception as exc:  # noqa: BLE001 - the group is whole without it: it only replays more
                step.detail = f"went on without it ({_cause(exc)}): the group starts at {plan.host}'s last restartpoint"
    if backup is not None:
        with reporter.step(f"pg_backup_start on {plan.host}") as step:
            try:
                step.detail = f"WAL from {backup.start()}"
            except Exception as exc:  # noqa: BLE001 - a driver error or igops' own, said in one line
                raise IgopsError(
                    f"pg_backup_start on {plan.host} failed: {_cause(exc)}; nothing was frozen",
                    f"start Postgres on {plan.host}: a group of a member of {plan.wal_cluster} records where its "
                    "WAL starts (the fleet archives WAL)",
                ) from None
    if plan.pre_freeze:
        with reporter.step(f"pre-freeze hook on {plan.host}"):
            [hook] = remote.run([target], plan.pre_freeze, settings, timeout=120)
            if not hook.ok:
                raise RemoteError(
                    f"pre-freeze hook failed on {plan.host}: "
                    f"{hook.error or hook.stderr.strip() or 'exit ' + str(hook.exit_code)}",
                    "nothing was frozen; fix the hook or pass --no-hook",
                )

    command, stdin = agent.invocation("freeze", [f"{plan.freeze_deadline:g}", *plan.mounts])
    with remote_session.Session(target, command, settings, stdin_prefix=stdin) as session:
        with reporter.step(f"freeze {', '.join(plan.mounts)} on {plan.host}") as step:
            event = _event(session, plan.freeze_deadline + settings.connect_timeout)
            if event.get("event") != "frozen":
                raise RemoteError(
                    f"freeze on {plan.host} failed: {event.get('message', 'no answer')}"
                    + (f" ({session.stderr().strip()})" if not event else ""),
                    "nothing is left frozen; the watchdog thaws by the deadline in any case",
                )
            step.detail = f"frozen in {event['freeze_ms']:.0f} ms"
        failure: Exception | None = late_freeze(event, plan.freeze_deadline)
        thaw_sent = threading.Event()

        def request_thaw() -> None:
            # Called from a failing call's thread and after the calls; the agent thaws on the first
            # request and exits, so a second write would meet a closed channel.
            if not thaw_sent.is_set():
                thaw_sent.set()
                try:
                    session.send(b"thaw\n")
                except OSError:
                    pass

        with reporter.step(
            f"snapshot {plural(len(plan.volumes), 'volume')}"
            + (" (CreateSnapshots)" if plan.one_call else " (parallel CreateSnapshot)")
        ) as step:
            try:
                if failure is not None:
                    raise failure
                result.snapshots = _take_snapshots(ebs, plan, common, on_first_failure=request_thaw)
            except Exception as exc:  # noqa: BLE001 - the thaw below must happen first
                failure = exc
                result.snapshots = getattr(exc, "made", {})
                step.status, step.detail = "failed", str(exc)[:200]
            request_thaw()
        with reporter.step(f"thaw {', '.join(reversed(plan.mounts))}") as step:
            event = _event(session, plan.freeze_deadline + settings.connect_timeout)
            if event.get("event") != "thawed":
                said = session.stderr().strip().splitlines()
                raise RemoteError(
                    f"thaw on {plan.host} not confirmed" + (f" ({said[-1][:200]})" if said else ""),
                    f"its watchdog thaws at the {plan.freeze_deadline:g} s deadline; check with `igops check`",
                )
            result.freeze_window_ms, result.thawed_by = event["window_ms"], event["reason"]
            step.detail = f"freeze window {event['window_ms']:.0f} ms"
            failure = failure or early_thaw(event, plan.freeze_deadline)
            if failure is not None:
                step.detail += f", thawed by {event['reason']}"

    mark = None
    if backup is not None and failure is None and len(result.snapshots) == len(plan.volumes):
        with reporter.step(f"pg_backup_stop on {plan.host}") as step:
            try:
                mark = backup.stop()
                step.detail = f"consistent at {mark.end} on timeline {mark.timeline}"
            except Exception as exc:  # noqa: BLE001 - a group without its WAL mark is discarded below
                failure = exc
                step.status, step.detail = "failed", str(exc)[:200]
    if failure is not None or len(result.snapshots) != len(plan.volumes):
        result.error = str(failure) if failure else "not every volume was snapshotted"
        with reporter.step(f"mark group {plan.group_id} failed and delete its snapshots"):
            _discard(ebs, plan.group_id, result.snapshots)
        raise SnapshotFailed(result)

    with reporter.step(f"tag {plural(len(result.snapshots), 'snapshot')}, group {plan.group_id}") as step:
        for volume in plan.volumes:
            ebs.tag(
                [result.snapshots[volume.volume_id]],
                {
                    TAG_MOUNT: volume.mount,
                    TAG_DEVICE: volume.device,
                    TAG_FSTYPE: volume.fstype,
                    TAG_RAID_INDEX: str(volume.raid_index),
                    TAG_RAID_MEMBERS: str(volume.raid_members),
                    TAG_RAID_LEVEL: volume.raid_level or "none",
                    "Name": f"{plan.group_id} {volume.mount}#{volume.raid_index}",
                    TAG_FREEZE_MS: f"{result.freeze_window_ms:.1f}",
                },
            )
        if mark is not None:
            ebs.tag(list(result.snapshots.values()), mark.tags())
        ebs.tag(list(result.snapshots.values()), {TAG_STATE: STATE_COMPLETE})
        step.detail = _delete_strays(ebs, plan.group_id, result.snapshots)
    result.state = STATE_COMPLETE
    return result


def _delete_strays(ebs: Ebs, group_id: str, made: dict[str, str]) -> str | None:
    """Delete the snapshots with the group's tag that the calls did not answer with (see
    igops.snapshot_groups.SnapshotGroup.strays); what was done, for the step's detail. One that
    cannot be deleted is left: the group is complete without it, and listing, restore and prune
    leave it aside."""
    strays = [
        snapshot["SnapshotId"]
        for snapshot in ebs.snapshots({TAG_GROUP: group_id})
        if snapshot["SnapshotId"] not in made.values()
    ]
    if not strays:
        return None
    try:
        for snapshot_id in strays:
            ebs.delete_snapshot(snapshot_id)
    except IgopsError as exc:
        return f"stray snapshots {', '.join(strays)} not all deleted: {exc.one_line()}"[:300]
    return f"deleted {plural(len(strays), 'stray snapshot')}: {', '.join(strays)}"


class SnapshotFailed(IgopsError):
    def __init__(self, result: CreateResult):
        super().__init__(
            f"snapshot group {result.group_id} failed: {result.error}",
            "the filesystems were thawed at once and the group's snapshots deleted",
        )
        self.result = result


def late_freeze(frozen: dict[str, Any], deadline: float) -> IgopsError | None:
    """The freeze itself outlasted the deadline: the agent thaws at once, so no snapshot taken
    now would be consistent."""
    if frozen.get("deadline_ms", 1) <= 0:
        return IgopsError(
            f"freezing took longer than the {deadline:g} s deadline ({frozen['freeze_ms']:.0f} ms); "
            "no snapshot was taken"
        )
    return None


def early_thaw(thawed: dict[str, Any], deadline: float) -> IgopsError | None:
    """Only a thaw that igops asked for, after every call returned, proves the snapshots were
    taken while frozen. A thaw at the deadline, or on a closed channel, may have come first."""
    if thawed.get("reason") != "request":
        cause = (
            f"the {deadline:g} s freeze deadline passed"
            if thawed.get("reason") == "deadline"
            else f"the freeze ended early ({thawed.get('reason', 'no reason given')})"
        )
        return IgopsError(
            f"{cause} before the snapshot calls returned: the filesystems were thawed while "
            "they ran, so the snapshots may not be consistent"
        )
    return None


def _event(session: remote_session.Session, timeout: float) -> dict[str, Any]:
    line = session.read_line(timeout)
    if not line:
        return {}
    try:
        event: dict[str, Any] = json.loads(line)
        return event
    except ValueError:
        return {"event": "error", "message": line[:200]}


def _take_snapshots(
    ebs: Ebs, plan: CreatePlan, tags: dict[str, str], on_first_failure: Callable[[], None]
) -> dict[str, str]:
    description = f"igops {plan.group_id} {plan.host}"
    if plan.one_call:
        answered = ebs.create_snapshots(plan.instance_id, description, tags)
        return {volume.volume_id: answered[volume.volume_id] for volume in plan.volumes if volume.volume_id in answered}
    made: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=len(plan.volumes)) as pool:
        futures = {
            pool.submit(ebs.create_snapshot, volume.volume_id, description, tags): volume.volume_id
            for volume in plan.volumes
        }
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(future.exception() for future in done):
            on_first_failure()
        wait(futures)
        errors = []
        for future, volume_id in futures.items():
            if future.exception():
                errors.append(f"{volume_id}: {future.exception()}")
            else:
                made[volume_id] = future.result()
    if errors:
        raise PartialSnapshot(made, "; ".join(errors))
    return made


class PartialSnapshot(IgopsError):
    def __init__(self, made: dict[str, str], message: str):
        super().__init__(message)
        self.made = made


def _discard(ebs: Ebs, group_id: str, snapshots: dict[str, str]) -> None:
    """Delete a failed group's snapshots: those the calls answered, and any stray the group's tag
    finds (a call whose answer was lost made one too)."""
    found = {snapshot["SnapshotId"] for snapshot in ebs.snapshots({TAG_GROUP: group_id})}
    for snapshot_id in sorted(found | set(snapshots.values())):
        try:
            ebs.delete_snapshot(snapshot_id)
        except IgopsError:
            ebs.tag([snapshot_id], {TAG_STATE: STATE_FAILED})
