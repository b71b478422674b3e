"""The monitoring a fleet in service has, and `igops check` expects: igops' Munin plugins on every
host, the inventory's Pingdom checks, and a recent complete snapshot group of every Postgres
cluster and of the Redis set.

`lab up` establishes each through igops' own code (`munin install`, `pingdom sync`,
`snapshot create`), and only where it is missing, so a fresh lab checks OK and a running one is
left as it is. Snapshots are taken on a standby or replica: freezing a primary stalls its writes.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from igops.lab.proc import LabError
from igops.output import Reporter, plural

# The Pingdom receiver tests its checks every 5 s; a check it has not tested yet is "unknown".
PINGDOM_FIRST_TEST_S = 15.0


def munin_plugins(fleet) -> str:
    """`igops munin install` on every host: writes and restarts only where something differs."""
    from igops.checks import munin

    results = munin.install(fleet, munin.plan_install(fleet, None))
    failed = [f"{result.host}: {result.error}" for result in results if not result.ok]
    if failed:
        raise LabError("igops munin install failed on " + "; ".join(failed),
                       "see hosts/<host>/munin/munin-node.log under the lab's state dir")
    changed = [result.host for result in results if result.changed]
    return (f"installed on {', '.join(changed)}" if changed else "in place") + f" ({plural(len(results), 'host')})"


def pingdom_checks(fleet) -> str:
    """`igops pingdom sync`, then wait until the receiver has tested every check once."""
    from igops.checks import pingdom

    client = pingdom.Pingdom.for_fleet(fleet)
    try:
        plan = pingdom.plan_sync(client, fleet)
        if plan.changes:
            pingdom.apply_sync(client, plan, Reporter())
        wanted = {check.name for check in pingdom.desired_checks(fleet)}
        deadline = time.monotonic() + PINGDOM_FIRST_TEST_S
        while True:
            untested = sorted(check["name"] for check in client.checks(plan.tag)
                              if check["name"] in wanted and check.get("status", "unknown") == "unknown")
            if not untested:
                break
            if time.monotonic() > deadline:
                raise LabError(f"Pingdom has not tested {', '.join(untested)} within {PINGDOM_FIRST_TEST_S:g} s",
                               "see services/receivers.log under the lab's state dir")
            time.sleep(0.5)
    finally:
        client.close()
    return (f"{plural(len(plan.changes), 'change')} synced" if plan.changes
            else f"in sync ({plural(len(plan.unchanged), 'check')})")


def snapshot_sets(fleet) -> dict[str, tuple[set[str], str]]:
    """Each set of hosts that hold the same data -> (its members, the member to snapshot): a
    Postgres cluster's standby, the Redis set's replica."""
    model = fleet.model
    sets = {f"cluster {name}": ({cluster.primary, *cluster.standbys}, cluster.standbys[0])
            for name, cluster in model.postgres.clusters.items() if cluster.standbys}
    if model.redis.master and model.redis.replicas:
        sets["redis"] = ({model.redis.master, *model.redis.replicas}, model.redis.replicas[0])
    return sets


def snapshots(fleet) -> str:
    """`igops snapshot create` on the standby of each set without a complete group younger than
    the check's warning age."""
    from igops import snapshot
    from igops.ebs import Ebs

    ebs = Ebs(fleet)
    groups = snapshot.groups(ebs)
    now = datetime.now(timezone.utc)
    fresh_enough = fleet.model.check.snapshot_warning_hours * 3600
    taken = []
    for name, (members, target) in snapshot_sets(fleet).items():
        if any(group.host in members and group.state == snapshot.STATE_COMPLETE
               and (now - group.created).total_seconds() < fresh_enough for group in groups):
            continue
        result = snapshot.create(fleet, snapshot.plan_create(fleet, target, ebs=ebs), Reporter(), ebs=ebs)
        if result.state != snapshot.STATE_COMPLETE:
            raise LabError(f"igops snapshot create {target} ({name}) ended {result.state}: {result.error}",
                           f"run `igops snapshot create {target}` against the lab to see every step")
        taken.append(f"{result.group_id} ({name})")
    return "took " + ", ".join(taken) if taken else "every cluster has a recent group"


def standbys_caught_up(paths, primaries: dict[str, str], timeout: float = 30) -> str:
    """Until each standby has replayed the WAL its primary had written when asked: right after a
    burst of writes a healthy standby lags past the check's warning for a moment."""
    from igops.lab.postgres import Node
    from igops.lab.state import CLUSTERS

    deadline = time.monotonic() + timeout
    adrift = []
    for cluster in CLUSTERS:
        primary = Node(paths, primaries[cluster.name])
        position = primary.psql("SELECT pg_current_wal_lsn()")
        for name in (cluster.primary, cluster.standby):
            if name == primary.name:
                continue
            standby = Node(paths, name)
            # A member that does not stream (an old primary a failover fenced, awaiting its rejoin)
            # will not catch up by waiting: that is `igops pg rejoin`'s job, not the lab's.
            if standby.psql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'") != "1":
                adrift.append(f"{name} does not stream (igops pg rejoin {name})")
                continue
            while standby.psql("SELECT pg_last_wal_replay_lsn() >= :'position'::pg_lsn", position=position) != "t":
                if time.monotonic() > deadline:
                    raise LabError(f"{name} has not replayed {cluster.name}'s WAL up to {position} "
                                   f"within {timeout:g} s", f"see hosts/{name}/log/postgresql.log under the "
                                   "lab's state dir, and `igops pg status " + cluster.name + "`")
                time.sleep(0.1)
    return "; ".join(adrift) if adrift else "every standby has replayed its primary's WAL"
