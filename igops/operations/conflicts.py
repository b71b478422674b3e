"""Which operations exclude which: the one table of the resources each kind of operation leases.

Two operations conflict when they lease a common resource. A resource is a (class, name) pair;
its lock is named `class--name` on both backends (a flock file locally, a key in etcd). The
table is about targets, not command names: `pg switchover main` and a shard move into `main`
both lease `pg main`, so one waits for (or is refused by) the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from igops.inventory import Fleet

Resource = tuple[str, str]


@dataclass(frozen=True)
class Kind:
    """A kind of operation: what it leases, said once for the docs, and how long it should
    take (`igops check` calls one holding its lease much longer CRITICAL)."""

    name: str
    leases: str
    expected_s: float


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("pg-switchover", "pg CLUSTER", 300),
        Kind("pg-failover", "pg CLUSTER", 300),
        Kind("pg-rejoin", "pg CLUSTER", 900),
        Kind("pg-rebuild", "pg CLUSTER, snapshot-group GROUP", 3600),
        Kind("pg-archive-setup", "pg CLUSTER", 900),
        Kind("redis-switchover", "redis", 120),
        Kind("redis-failover", "redis", 120),
        Kind("redis-rejoin", "redis", 600),
        Kind("shard-init", "pg CLUSTER, for every cluster", 600),
        Kind("shard-move", "shard N, pg SOURCE, pg TARGET", 6 * 3600),
        Kind("shard-rebalance", "pg CLUSTER, for every cluster", 24 * 3600),
        Kind("snapshot-create", "host HOST, and pg CLUSTER or redis when HOST is a member", 900),
        Kind("snapshot-prune", "snapshots; snapshot-group GROUP while it deletes the group", 900),
        Kind("snapshot-delete", "snapshots, snapshot-group GROUP", 300),
        Kind("snapshot-keep", "snapshots", 60),
        Kind("snapshot-restore", "host TARGET, snapshot-group GROUP", 3600),
        Kind("snapshot-drill", "host TARGET, snapshot-group GROUP", 3 * 3600),
        Kind("warm", "warm HOST", 6 * 3600),
        Kind("deploy", "app HOST, for each app server of --hosts (all by default); rotation HOST while out", 3600),
        Kind(
            "deploy-rollback",
            "app HOST, for each app server of --hosts (all by default); rotation HOST while out",
            3600,
        ),
        Kind("munin-install", "munin", 900),
        Kind("pingdom-sync", "pingdom", 300),
        Kind("pingdom-maintenance", "pingdom", 300),
        Kind("pagerduty-test", "pagerduty", 60),
    )
}


def kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown operation kind {name!r}: add it to igops.operations.conflicts.KINDS") from None


def pg_cluster(cluster: str) -> Resource:
    return ("pg", cluster)


REDIS: Resource = ("redis", "all")
# What deploys and rollbacks leased before they leased app servers one by one: the record of an
# operation interrupted then still names it.
APP: Resource = ("app", "all")
SNAPSHOTS: Resource = ("snapshots", "all")
MUNIN: Resource = ("munin", "all")
PINGDOM: Resource = ("pingdom", "all")
PAGERDUTY: Resource = ("pagerduty", "all")


def warm(name: str) -> Resource:
    """Warming reads a host's files for hours: it excludes only another warm of that host."""
    return ("warm", name)


def host(name: str) -> Resource:
    return ("host", name)


def app_server(name: str) -> Resource:
    """An app server's release (its `current` switch): one deploy or rollback at a time. Two
    deploys to different servers run at once; how many servers they may take out of rotation
    together is igops.operations.rotation's."""
    return ("app", name)


def shard(number: int) -> Resource:
    return ("shard", str(number))


def for_host(fleet: Fleet, name: str) -> list[Resource]:
    """A host, and the replicated set it belongs to: work on one member's data (a snapshot)
    must not overlap a change of that set's roles."""
    resources = [host(name)]
    for cluster, members in fleet.model.postgres.clusters.items():
        if name == members.primary or name in members.standbys:
            resources.append(pg_cluster(cluster))
    redis = fleet.model.redis
    if redis.master and (name == redis.master or name in redis.replicas):
        resources.append(REDIS)
    return resources


def every_cluster(fleet: Fleet) -> list[Resource]:
    return [pg_cluster(name) for name in fleet.model.postgres.clusters]


def conflicting(first: list[Resource], second: list[Resource]) -> list[Resource]:
    """The resources two operations both lease: empty when they may run at once."""
    return sorted(set(first) & set(second))


def table_rows() -> list[tuple[str, str, str]]:
    """(kind, what it leases, expected duration) for docs/operations.md and `igops ops kinds`."""
    return [(k.name, k.leases, _duration(k.expected_s)) for k in KINDS.values()]


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min"
