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
from igops.output import plural
from igops.snapshot import STATE_COMPLETE, STATE_PENDING, STATE_TAKING, SnapshotGroup, stale

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
    """When the newest group that counts as taken began: complete, pending (EBS still copying),
    or still being taken by a create that may be running."""
    taken = [
        group.created
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


@dataclass
class PrunePlan:
    keep: dict[str, list[str]]  # group id -> why it is kept
    delete: list[SnapshotGroup]
    # The archived WAL no group left needs (igops.pg.archive_repository.for_prune).
    wal: list[WalExpiry] = field(default_factory=list)

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
) -> PrunePlan:
    """Which groups to keep and delete, per set of data (`set_key` names a group's set; groups of
    a set without rules are left alone).

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
            if group.state == STATE_COMPLETE or stale(group, now, grace):
                delete.append(group)
    return PrunePlan(dict(keep), sorted(delete, key=lambda g: g.created))


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
