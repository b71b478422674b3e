"""The monitoring a fleet in service has, and `igops check` expects: igops' Munin plugins on every
host, the inventory's Pingdom checks, and the snapshot group of every Postgres cluster and of
the Redis set that the [snapshot] policy wants; and every cluster's WAL archiving (its stanza
again when moto, which forgets its buckets, restarted).

`lab up` establishes each through igops' own code (`munin install`, `pingdom sync`, `snapshot
cron`'s choice of member and `snapshot create`), and only where it is missing, so a fresh lab
checks OK and a running one is left as it is. Snapshots are taken on a standby or replica:
freezing a primary stalls its writes.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from igops.lab.proc import LabError
from igops.output import Reporter, plural

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.lab.state import Paths

# The Pingdom receiver tests its checks every 5 s; a check it has not tested yet is "unknown".
PINGDOM_FIRST_TEST_S = 15.0


def munin_plugins(fleet: Fleet) -> str:
    """`igops munin install` on every host: writes and restarts only where something differs."""
    from igops.checks import munin

    results = munin.install(fleet, munin.plan_install(fleet, None))
    failed = [f"{result.host}: {result.error}" for result in results if not result.ok]
    if failed:
        raise LabError(
            "igops munin install failed on " + "; ".join(failed),
            "see hosts/<host>/munin/munin-node.log under the lab's state dir",
        )
    changed = [result.host for result in results if result.changed]
    return (f"installed on {', '.join(changed)}" if changed else "in place") + f" ({plural(len(results), 'host')})"


def pingdom_checks(fleet: Fleet) -> str:
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
            untested = sorted(
                check["name"]
                for check in client.checks(plan.tag)
                if check["name"] in wanted and check.get("status", "unknown") == "unknown"
            )
            if not untested:
                break
            if time.monotonic() > deadline:
                raise LabError(
                    f"Pingdom has not tested {', '.join(untested)} within {PINGDOM_FIRST_TEST_S:g} s",
                    "see services/receivers.log under the lab's state dir",
                )
            time.sleep(0.5)
    finally:
        client.close()
    return (
        f"{plural(len(plan.changes), 'change')} synced"
        if plan.changes
        else f"in sync ({plural(len(plan.unchanged), 'check')})"
    )


def snapshots(fleet: Fleet) -> str:
    """`igops snapshot cron`'s takes: a group of each set of data whose [snapshot] schedule wants
    one (or, without a schedule, that has no complete group younger than the check's warning
    age), taken on a streaming standby or linked replica."""
    from igops import snapshot, snapshot_cron, snapshot_groups, snapshot_policy
    from igops.ebs import Ebs

    ebs = Ebs(fleet)
    groups = snapshot_groups.groups(ebs)
    now = datetime.now(UTC)
    grace = timedelta(minutes=fleet.model.snapshot.stale_after_minutes)
    fresh_enough = timedelta(hours=fleet.model.check.snapshot_warning_hours)
    taken = []
    for data_set in snapshot_policy.data_sets(fleet):
        if data_set.policy.schedule is not None:
            needed = snapshot_policy.due(data_set, groups, now, grace)
        else:
            needed = not any(
                data_set.holds(group)
                and group.state == snapshot_groups.STATE_COMPLETE
                and now - group.created < fresh_enough
                for group in groups
            )
        if not needed:
            continue
        take = snapshot_cron.choose(fleet, data_set)
        if take.error and len(data_set.members) > 1:
            # A fenced old primary awaiting `pg rejoin` streams from no one; the lab's inventory
            # lists the live primary first, so its second member is the one that is not it.
            take = snapshot_cron.Take(data_set.name, data_set.label, data_set.members[1], "not the primary")
        plan = snapshot_cron.plan_take(fleet, ebs, take)
        if plan is None:
            raise LabError(f"cannot snapshot {take.label}: {take.error}", take.hint)
        result = snapshot.create(fleet, plan, Reporter(), ebs=ebs)
        if result.state != snapshot_groups.STATE_COMPLETE:
            raise LabError(
                f"igops snapshot create {take.host} ({take.label}) ended {result.state}: {result.error}",
                f"run `igops snapshot create {take.host}` against the lab to see every step",
            )
        taken.append(f"{result.group_id} ({take.label})")
    return "took " + ", ".join(taken) if taken else "every set of data has the group its policy wants"


def standbys_caught_up(paths: Paths, primaries: dict[str, str], timeout: float = 30) -> str:
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
                    raise LabError(
                        f"{name} has not replayed {cluster.name}'s WAL up to {position} within {timeout:g} s",
                        f"see hosts/{name}/log/postgresql.log under the "
                        "lab's state dir, and `igops pg status " + cluster.name + "`",
                    )
                time.sleep(0.1)
    return "; ".join(adrift) if adrift else "every standby has replayed its primary's WAL"


def wal_archiving(fleet: Fleet) -> str:
    """Every cluster archives its WAL, as the fleet the lab imitates does (`[archive]` is in its
    inventory, and `igops check` holds a cluster that does not archive for CRITICAL): what
    `igops pg archive setup CLUSTER --restart-primary` plans, applied. Once set up, the plan is
    empty unless moto restarted: it keeps its buckets in memory, so the WAL bucket is empty again,
    every archive-push fails and the WAL piles up on the small lab volumes until the stanza exists
    again (stanza-create is then the plan)."""
    from igops.errors import IgopsError
    from igops.lab.state import CLUSTERS
    from igops.pg.archive import plan_archive_setup
    from igops.pg.archive_actions import apply_archive_setup

    done = []
    for cluster in CLUSTERS:
        try:
            plan = plan_archive_setup(fleet, cluster.name, restart_primary=True)
            if plan.actions:
                apply_archive_setup(fleet, plan)
                done.append(f"{cluster.name} ({plural(len(plan.actions), 'step')})")
        except IgopsError as exc:
            raise LabError(
                f"{cluster.name}: WAL archiving: {exc.message}",
                exc.hint or f"`igops pg archive setup {cluster.name} --dry-run` shows what is left",
            ) from None
    return ("set up: " + ", ".join(done)) if done else "every cluster archives to its stanza"
