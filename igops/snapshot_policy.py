"""The backup policy of snapshot groups, as pure logic: which sets of data there are, when each
is due, which groups retention keeps, and what deleting a group would risk.

A set of data is what one group restores: a Postgres cluster (its members hold the same data,
so a group of any member, preferably a standby, backs up the cluster), the Redis set (master
and replicas), or a host with data mounts in neither. Policies come from the inventory's
[snapshot] table, overridden per cluster ([snapshot.clusters.NAME]), for the Redis set
([snapshot.redis]) and per host ([snapshot.hosts.NAME]).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from igops import schedule as schedules
from igops.errors import RefusedError, UsageError
from igops.operations import conflicts
from igops.output import plural
from igops.snapshot_groups import (
    STATE_COMPLETE,
    STATE_PENDING,
    STATE_TAKING,
    SnapshotGroup,
    changes_to,
    delete_steps,
    in_use,
    snapshot_ids,
    stale,
)

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.inventory_model import SnapshotPolicy
    from igops.pg.archive_repository import WalExpiry

DEFAULT_MINIMUM_REDUNDANCY = 1
POLICY_KEYS = (
    "schedule",
    "keep_last",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "minimum_redundancy",
)


@dataclass(frozen=True)
class Retention:
    """GFS counts: the `last` newest complete groups, and the newest of each of the last N
    hours, days, ISO weeks and months that have one."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly)

    def describe(self) -> str:
        counts = [
            f"{name} {count}"
            for name, count in (
                ("last", self.last),
                ("hourly", self.hourly),
                ("daily", self.daily),
                ("weekly", self.weekly),
                ("monthly", self.monthly),
            )
            if count
        ]
        return ", ".join(counts) or "keep every group"


@dataclass(frozen=True)
class Policy:
    schedule: schedules.Schedule | None = None
    retention: Retention = Retention()
    minimum_redundancy: int = DEFAULT_MINIMUM_REDUNDANCY


@dataclass(frozen=True)
class DataSet:
    kind: str  # "cluster", "redis" or "host"
    name: str  # the cluster's name, "redis", or the host's name: the check's target
    members: tuple[str, ...]  # inventory order (a cluster's listed primary first)
    policy: Policy = Policy()

    @property
    def label(self) -> str:
        kinds = {"cluster": f"Postgres cluster {self.name}", "redis": "the Redis set"}
        return kinds.get(self.kind, f"host {self.name}")

    def holds(self, group: SnapshotGroup) -> bool:
        return group.host in self.members


def policy_from(default: SnapshotPolicy, override: SnapshotPolicy | None = None) -> Policy:
    """A Policy from the inventory's [snapshot] table and an optional override table."""

    def value(key: str) -> Any:
        own = getattr(override, key, None) if override is not None else None
        return own if own is not None else getattr(default, key, None)

    text = value("schedule")
    redundancy = value("minimum_redundancy")
    return Policy(
        schedules.parse(text) if text else None,
        Retention(*(value(f"keep_{name}") or 0 for name in ("last", "hourly", "daily", "weekly", "monthly"))),
        DEFAULT_MINIMUM_REDUNDANCY if redundancy is None else redundancy,
    )


def data_sets(fleet: Fleet) -> list[DataSet]:
    """Every set of data in the fleet that has something to snapshot (a member with data mounts
    and an instance id), each with its policy."""
    model = fleet.model
    config = model.snapshot

    def snapshottable(name: str) -> bool:
        host = fleet.hosts_by_name.get(name)
        return bool(host is not None and host.mounts and host.instance_id)

    found: list[DataSet] = []
    grouped: set[str] = set()
    for name, cluster in model.postgres.clusters.items():
        members = (cluster.primary, *cluster.standbys)
        grouped.update(members)
        if any(snapshottable(member) for member in members):
            found.append(DataSet("cluster", name, members, policy_from(config, config.clusters.get(name))))
    if model.redis.master:
        members = (model.redis.master, *model.redis.replicas)
        grouped.update(members)
        if any(snapshottable(member) for member in members):
            found.append(DataSet("redis", "redis", members, policy_from(config, config.redis)))
    for host in model.hosts:
        if host.name not in grouped and snapshottable(host.name):
            found.append(DataSet("host", host.name, (host.name,), policy_from(config, config.hosts.get(host.name))))
    return found


def set_of(sets: list[DataSet], host_name: str) -> DataSet | None:
    return next((data_set for data_set in sets if host_name in data_set.members), None)


# --- due ----------------------------------------------------------------------------------------
def last_taken(groups: list[SnapshotGroup], now: datetime, grace: timedelta) -> datetime | None:
    """When the newest group that counts as taken began (by the clock of the machine that took it:
    SnapshotGroup.taken_for): complete, pending (EBS still copying), or still being taken by a
    create that may be running."""
    taken = [
        group.taken_for
        for group in groups
        if group.state in (STATE_COMPLETE, STATE_PENDING)
        or (group.state == STATE_TAKING and not stale(group, now, grace))
    ]
    return max(taken, default=None)


def due(data_set: DataSet, groups: list[SnapshotGroup], now: datetime, grace: timedelta) -> bool:
    """Whether the set's schedule wants a group now; never for a set without a schedule."""
    if data_set.policy.schedule is None:
        return False
    return data_set.policy.schedule.due(last_taken([g for g in groups if data_set.holds(g)], now, grace), now)


# --- retention ----------------------------------------------------------------------------------
BUCKETS: dict[str, Callable[[datetime], str]] = {
    "hourly": lambda moment: moment.strftime("%Y-%m-%d %H"),
    "daily": lambda moment: moment.strftime("%Y-%m-%d"),
    "weekly": lambda moment: "{}-W{:02d}".format(*moment.isocalendar()[:2]),
    "monthly": lambda moment: moment.strftime("%Y-%m"),
}


# The rule a prune follows that its plan cannot list: who reads a group is known only under the lease.
IN_USE_NOTE = (
    "a group that a restore, drill or in-place rebuild reads from (holding its lease) is left, and so is "
    "its cluster's WAL: a later prune deletes them"
)


@dataclass(frozen=True)
class PruneInputs:
    """What a prune plan was made with, besides the groups and the time: the prune makes it again
    under its lease, from the groups as they are then (igops.snapshot_prune.prune)."""

    set_key: Callable[[SnapshotGroup], str | None]
    rules: Mapping[str, SetRetention]
    grace: timedelta
    host: str | None = None  # only this host's groups are deleted


@dataclass
class PrunePlan:
    keep: dict[str, list[str]]  # group id -> why it is kept
    delete: list[SnapshotGroup]
    # The archived WAL no group left needs (igops.pg.archive_repository.for_prune).
    wal: list[WalExpiry] = field(default_factory=list)
    # What it was made with (plan_prune), to make it again under the prune's lease: see remade.
    made_with: PruneInputs = field(kw_only=True)

    def steps(self) -> list[str]:
        return [
            *(
                f"delete group {group.group_id} ({group.host}, {group.state}, "
                f"{group.created:%Y-%m-%d %H:%M} UTC, {plural(group.volumes, 'snapshot')})"
                for group in self.delete
            ),
            *(expiry.step() for expiry in self.wal),
        ] or ["nothing to delete"]

    def empty(self) -> bool:
        return not self.delete and not self.wal

    def notes(self) -> list[str]:
        return [IN_USE_NOTE] if self.delete else []

    def remade(self, groups: list[SnapshotGroup], now: datetime) -> PrunePlan:
        """The plan made again, with what it was made with, from `groups` as they are `now`."""
        made = self.made_with
        return plan_prune(groups, made.set_key, made.rules, now, made.grace, made.host)

    def changes(self, now: PrunePlan, groups: list[SnapshotGroup]) -> list[str]:
        """Why the plan no longer holds, made again (`now`) from `groups` as they are: each group
        it deletes must still be there, with the same snapshots, and be one to delete (not pinned
        since, nor needed for the minimum redundancy after a delete). A plan that would now delete
        more still holds: what it leaves, the next prune deletes."""
        found = {group.group_id: group for group in groups}
        deleting = {group.group_id for group in now.delete}
        changes = []
        for group in self.delete:
            current = found.get(group.group_id)
            if current is None:
                changes.append(f"group {group.group_id} is gone")
            elif group.group_id in now.keep:
                changes.append(f"group {group.group_id} is kept now ({', '.join(now.keep[group.group_id])})")
            elif group.group_id not in deleting or snapshot_ids(current) != snapshot_ids(group):
                changes.append(
                    f"group {group.group_id} changed ({current.state}, {plural(current.volumes, 'snapshot')})"
                )
        return changes

    def wal_changes(self, allowed: list[WalExpiry]) -> list[str]:
        """The clusters whose WAL the plan expires and the groups it leaves now need some of
        (`allowed`: the expiry those groups allow now)."""
        keys = {expiry.cluster: set(expiry.keys) for expiry in allowed}
        return [
            f"{expiry.cluster}'s WAL before {expiry.needed.segment} is needed now"
            for expiry in self.wal
            if not set(expiry.keys) <= keys.get(expiry.cluster, set())
        ]


@dataclass(frozen=True)
class SetRetention:
    """What prune applies to one set: its retention and its minimum redundancy."""

    retention: Retention
    minimum_redundancy: int = DEFAULT_MINIMUM_REDUNDANCY


def plan_prune(
    groups: list[SnapshotGroup],
    set_key: Callable[[SnapshotGroup], str | None],
    rules: Mapping[str, SetRetention],
    now: datetime,
    grace: timedelta,
    host: str | None = None,
) -> PrunePlan:
    """Which groups to keep and delete, per set of data (`set_key` names a group's set; groups of
    a set without rules are left alone); with `host`, only that host's groups are deleted, with
    retention still counted over each whole set.

    Only complete groups count toward retention. A set's newest complete group is always kept,
    and so are groups pinned with `igops snapshot keep`. Then the GFS counts; then, while fewer
    than the set's minimum redundancy of complete groups would remain, the newest of the others.
    An empty retention keeps every complete group. Stale groups (taking or failed for longer
    than `grace`) are deleted unless pinned; younger ones may still be finishing or cleaning up.
    """
    keep: dict[str, list[str]] = defaultdict(list)
    delete: list[SnapshotGroup] = []
    by_set: dict[str, list[SnapshotGroup]] = defaultdict(list)
    chosen: dict[str, SetRetention] = {}
    for group in groups:
        key = set_key(group)
        if key is None:  # in no set: left alone
            continue
        try:
            chosen[key] = rules[key]  # a defaultdict gives every set the same rule
        except KeyError:
            continue
        by_set[key].append(group)
    for key, members in by_set.items():
        rule = chosen[key]
        complete = sorted((g for g in members if g.state == STATE_COMPLETE), key=lambda g: g.created, reverse=True)
        for group in members:
            if group.kept:
                keep[group.group_id].append("kept")
        if complete:
            keep[complete[0].group_id].append("newest complete")
        if rule.retention.empty():
            for group in complete[1:]:
                keep[group.group_id].append("no retention")
        for group in complete[: rule.retention.last]:
            keep[group.group_id].append("last")
        for name in ("hourly", "daily", "weekly", "monthly"):
            count = getattr(rule.retention, name)
            seen: set[str] = set()
            for group in complete:
                bucket = BUCKETS[name](group.created)
                if bucket not in seen and len(seen) < count:
                    seen.add(bucket)
                    keep[group.group_id].append(name)
        kept_complete = sum(1 for group in complete if group.group_id in keep)
        for group in complete:
            if kept_complete >= rule.minimum_redundancy:
                break
            if group.group_id not in keep:
                keep[group.group_id].append(f"minimum redundancy {rule.minimum_redundancy}")
                kept_complete += 1
        for group in members:
            if group.group_id in keep:
                continue
            if (group.state == STATE_COMPLETE or stale(group, now, grace)) and host in (None, group.host):
                delete.append(group)
    return PrunePlan(
        dict(keep), sorted(delete, key=lambda g: g.created), made_with=PruneInputs(set_key, rules, grace, host)
    )


def prune_rules(
    sets: list[DataSet], counts: Retention | None = None
) -> tuple[Callable[[SnapshotGroup], str], Mapping[str, SetRetention]]:
    """`plan_prune`'s set key and rules: each set's policy, or `counts` for every set when given
    (with each set's minimum redundancy). A host in no set (say, one no longer in the inventory)
    is a set of its own, pruned only by explicit counts."""

    def set_key(group: SnapshotGroup) -> str:
        found = set_of(sets, group.host)
        return found.name if found else f"host {group.host}"

    given = counts if counts is not None and not counts.empty() else None
    rules: dict[str, SetRetention] = {
        data_set.name: SetRetention(
            given if given is not None else data_set.policy.retention, data_set.policy.minimum_redundancy
        )
        for data_set in sets
    }
    if given is not None:
        return set_key, defaultdict(lambda: SetRetention(given), rules)
    return set_key, rules


# --- delete -------------------------------------------------------------------------------------
@dataclass
class DeletePlan:
    group: SnapshotGroup
    risks: list[str]  # what deleting it risks, each accepted (--accept-risk)

    def resources(self) -> list[conflicts.Resource]:
        """The lease of prune, delete and keep, and the group's own
        (igops.snapshot_groups.in_use): a group that a restore, drill or in-place rebuild reads
        from is refused."""
        return [conflicts.SNAPSHOTS, in_use(self.group.group_id)]

    def steps(self) -> list[str]:
        return delete_steps(self.group, self.risks)

    def changes(self, fleet: Fleet, groups: list[SnapshotGroup], now: datetime) -> list[str]:
        """Why the plan no longer holds, from `groups` as they are: its group gone or changed, or
        deleting it now risks what the plan did not accept."""
        group_id = self.group.group_id
        changes = changes_to(self.group, next((group for group in groups if group.group_id == group_id), None))
        if changes:
            return changes
        risks = plan_delete(fleet, groups, group_id, now, accept_risk=True).risks
        return [risk for risk in risks if risk not in self.risks]


def plan_delete(
    fleet: Fleet, groups: list[SnapshotGroup], group_id: str, now: datetime, accept_risk: bool = False
) -> DeletePlan:
    """The plan to delete one group; refused when deleting it risks anything (delete_risks) unless
    `accept_risk`."""
    found = next((group for group in groups if group.group_id == group_id), None)
    if found is None:
        raise UsageError(f"no snapshot group {group_id!r}", "see `igops snapshot list`")
    data_set = set_of(data_sets(fleet), found.host)
    siblings = [group for group in groups if (data_set.holds(group) if data_set else group.host == found.host)]
    risks = delete_risks(found, siblings, data_set, now, timedelta(minutes=fleet.model.snapshot.stale_after_minutes))
    if risks and not accept_risk:
        release = f"release it with `igops snapshot keep {found.group_id} --release`, or " if found.kept else ""
        raise RefusedError(
            f"refusing to delete {found.group_id}: " + "; ".join(risks),
            f"{release}pass --accept-risk to delete it anyway",
        )
    return DeletePlan(found, risks)


def delete_risks(
    group: SnapshotGroup, set_groups: list[SnapshotGroup], data_set: DataSet | None, now: datetime, grace: timedelta
) -> list[str]:
    """What deleting `group` would risk: a pinned group, a create that may still be running,
    or fewer complete groups of its set than the set's minimum redundancy (at least the last
    one)."""
    risks = []
    if group.kept:
        risks.append(f"group {group.group_id} is kept (pinned by `igops snapshot keep`)")
    if group.state == STATE_TAKING and not stale(group, now, grace):
        risks.append(f"group {group.group_id} is still being taken: its create may be running")
    if group.state == STATE_COMPLETE:
        label = data_set.label if data_set else f"host {group.host}"
        floor = max(data_set.policy.minimum_redundancy if data_set else DEFAULT_MINIMUM_REDUNDANCY, 1)
        left = sum(1 for other in set_groups if other.state == STATE_COMPLETE and other.group_id != group.group_id)
        if left < floor:
            risks.append(
                f"it would leave {left} complete {'group' if left == 1 else 'groups'} of {label}, "
                f"below its minimum redundancy of {floor}"
            )
    return risks
