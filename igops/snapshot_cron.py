"""`igops snapshot cron`: take the groups the policy says are due, and prune what it allows.

Meant to run every minute. A run holds the fleet's `snapshot-cron` lease for its whole length;
a run that finds it held (the previous one still working) does nothing and is silent. For each
set of data that is due, one member is snapshotted: for a Postgres cluster a streaming standby
(freezing the primary would stall every write), for the Redis set a linked replica; a cluster
or set listed with a single member is snapshotted on that member (a lone Postgres primary with
its write stall stated in the plan).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from igops import snapshot, snapshot_groups, snapshot_policy
from igops.errors import AlreadyRunning, IgopsError, RefusedError, Unavailable, first_line

if TYPE_CHECKING:
    from igops.ebs import Ebs
    from igops.inventory import Fleet

LEASE = ("snapshot-cron", "all")


@dataclass
class Take:
    """One due set of data and the member chosen to snapshot it (or why none could be)."""

    set_name: str
    label: str
    host: str | None = None
    why: str | None = None  # why this member: "streaming standby", …
    allow_primary: bool = False
    error: str | None = None
    hint: str | None = None


@contextmanager
def lease(fleet: Fleet, command_line: str) -> Iterator[bool]:
    """Hold the cron lease for the run: True when held, False when another run holds it."""
    from igops import coordination

    with ExitStack() as stack:
        try:
            holder = coordination.current_holder(LEASE[0], LEASE[1], command_line, coordination.reason())
            stack.enter_context(coordination.for_fleet(fleet).lease([LEASE], holder))
        except AlreadyRunning:
            yield False
            return
        yield True


def has_policy(fleet: Fleet) -> bool:
    """Whether any set of data has a schedule or retention counts for cron to follow."""
    return any(
        data_set.policy.schedule or not data_set.policy.retention.empty()
        for data_set in snapshot_policy.data_sets(fleet)
    )


def due_sets(fleet: Fleet, groups: list[snapshot_groups.SnapshotGroup], now: datetime) -> list[snapshot_policy.DataSet]:
    grace = timedelta(minutes=fleet.model.snapshot.stale_after_minutes)
    return [
        data_set for data_set in snapshot_policy.data_sets(fleet) if snapshot_policy.due(data_set, groups, now, grace)
    ]


def choose(fleet: Fleet, data_set: snapshot_policy.DataSet) -> Take:
    """The member to snapshot: asked of the members themselves, since a switchover or failover
    moves the roles and the inventory keeps naming them as they were."""
    take = Take(data_set.name, data_set.label)
    candidates = [
        name for name in data_set.members if fleet.hosts_by_name[name].mounts and fleet.hosts_by_name[name].instance_id
    ]
    if data_set.kind == "host" or len(data_set.members) == 1:
        take.host, take.why = candidates[0], "the only member"
        take.allow_primary = data_set.kind == "cluster"
        return take
    ask = _postgres_roles if data_set.kind == "cluster" else _redis_roles
    roles = ask(fleet, data_set.members)
    followers = [name for name in candidates if roles.get(name) == "following"]
    if followers:
        take.host = followers[0]
        take.why = "streaming standby" if data_set.kind == "cluster" else "linked replica"
        return take
    seen = "; ".join(f"{name}: {roles.get(name, 'no data mounts')}" for name in data_set.members)
    noun = "streaming standby" if data_set.kind == "cluster" else "replica linked to its master"
    take.error = f"{data_set.label} has no {noun} to snapshot ({seen})"
    take.hint = (
        "restore replication (`igops pg status` / `igops redis status`), or take a group by hand: "
        "`igops snapshot create HOST --yes` (--allow-primary accepts a primary's write stall)"
    )
    return take


def _postgres_roles(fleet: Fleet, members: Iterable[str]) -> dict[str, str]:
    """member -> "following" (a standby streaming from its upstream), "primary", "not streaming
    (…)" or why it could not be asked."""
    from igops import postgres

    roles: dict[str, str] = {}
    for name in members:
        try:
            connection = postgres.connect(fleet, fleet.host(name), timeout=5)
        except Unavailable as down:
            roles[name] = f"unreachable ({down.detail})"
            continue
        try:
            state = postgres.server_state(connection)
        except Exception as exc:  # noqa: BLE001 - a member that cannot answer is not chosen
            roles[name] = f"cannot tell its role ({first_line(exc)})"
            continue
        finally:
            connection.close()
        if not state.in_recovery:
            roles[name] = "primary"
        elif state.receiver_status == "streaming":
            roles[name] = "following"
        else:
            roles[name] = f"standby not streaming ({state.receiver_status or 'no WAL receiver'})"
    return roles


def _redis_roles(fleet: Fleet, members: Iterable[str]) -> dict[str, str]:
    from igops import redisops

    roles: dict[str, str] = {}
    for name in members:
        _, state, down = redisops.probe(fleet, name)
        if state is None:
            roles[name] = f"unreachable ({down.detail if down else 'no answer'})"
        elif state.role == "master":
            roles[name] = "master"
        elif state.link_up:
            roles[name] = "following"
        else:
            roles[name] = f"replica with its link down ({state.master_address})"
    return roles


def plan_take(fleet: Fleet, ebs: Ebs, take: Take) -> snapshot.CreatePlan | None:
    """The create plan for a chosen member; records why not on `take` when it is refused."""
    if take.error:
        return None
    assert take.host is not None  # choose names a member whenever it records no error
    try:
        return snapshot.plan_create(fleet, take.host, ebs=ebs, allow_primary=take.allow_primary)
    except RefusedError as refused:
        # e.g. the chosen standby was promoted between the question and the plan
        take.error, take.hint = refused.message, refused.hint
    except IgopsError as failed:
        take.error, take.hint = failed.message, failed.hint
    return None


def plan_prune(fleet: Fleet, groups: list[snapshot_groups.SnapshotGroup], now: datetime) -> snapshot_policy.PrunePlan:
    """What each set's policy lets go (an empty retention keeps every complete group and
    deletes only stale leftovers), and the archived WAL the groups left do not need; groups of
    hosts in no set are left alone."""
    from igops.pg import archive_repository

    sets = snapshot_policy.data_sets(fleet)
    plan = snapshot_policy.plan_prune(
        groups, *snapshot_policy.prune_rules(sets), now, timedelta(minutes=fleet.model.snapshot.stale_after_minutes)
    )
    return archive_repository.for_prune(fleet, groups, plan)
