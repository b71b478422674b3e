"""Planned switchover and unplanned failover for Postgres (repmgr behind PgBouncer) and Redis.

Every operation reads the live state first (roles are whatever the servers say, never what the
inventory says: the inventory names members, a failover does not rewrite it), refuses what is
unsafe, and builds a plan: an ordered list of steps, each naming the action that runs it. The
dry run prints that list and the apply walks the same list, so what was shown is what runs.

A step may carry an undo (run if a later step fails before the point of no return, e.g. start
the stopped old primary again) and a release (run on any failure once the step has run, e.g.
RESUME a paused PgBouncer): a failure leaves writes flowing and a report of where things stand.

Split brain is what these operations exist to prevent: at no moment are two servers writable
for the app. A switchover stops the old primary before the candidate is promoted; a failover
fences the old one first: PgBouncer stops routing to it and, on its disk, a standby.signal
(Postgres) or a replicaof line (Redis) makes it come back read-only if it is ever restarted.

This module is the entry `igops pg`, `igops redis` and `igops ops resume|abort` call: the
status, plan and apply functions and their types, and what both kinds of plan share (the
check, under the lock, that the state is still the one a plan was made for; a plan as data).
The pieces live in:

- igops/pg/: Postgres (the cluster's probed view, the plans, the step lists, `PgActions`);
- igops/redis_tier.py, igops/redis_failover.py: the Redis tier's view; its plans and actions;
- igops/role_change.py: the refusal both raise, `--accept-risk`, the shared waits;
- igops/host_commands.py: one command on one host over SSH, and files read and replaced there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from igops import redis_failover
from igops.pg import plans as pg_plans
from igops.pg.actions import PgActions, PgResult, apply_pg
from igops.pg.cluster import PgClusterState, PgNode, cluster_members, pg_status, pg_view
from igops.pg.failover_plans import plan_pg_failover, plan_pg_rejoin
from igops.pg.plans import PgPlan, plan_pg_switchover
from igops.redis_failover import (
    RedisActions,
    RedisPlan,
    RedisResult,
    apply_redis,
    plan_redis_failover,
    plan_redis_rejoin,
    plan_redis_switchover,
)
from igops.redis_tier import RedisNode, RedisState, redis_members, redis_status, redis_view
from igops.role_change import Refused

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.pg.cluster import PgView
    from igops.redis_tier import RedisView

__all__ = [
    "PgActions",
    "PgClusterState",
    "PgNode",
    "PgPlan",
    "PgResult",
    "RedisActions",
    "RedisNode",
    "RedisPlan",
    "RedisResult",
    "RedisState",
    "Refused",
    "apply_pg",
    "apply_redis",
    "check_unchanged",
    "cluster_members",
    "describe_plan",
    "pg_status",
    "plan_pg_failover",
    "plan_pg_rejoin",
    "plan_pg_switchover",
    "plan_redis_failover",
    "plan_redis_rejoin",
    "plan_redis_switchover",
    "redis_members",
    "redis_status",
]


def check_unchanged(fleet: Fleet, plan: PgPlan | RedisPlan) -> None:
    """Under the lock, after the confirmation: refuse if the state the plan was made for has
    changed (another operation, a node that came back), instead of acting on a stale plan."""
    view: RedisView | PgView
    if isinstance(plan, RedisPlan):
        view = redis_view(fleet)
        now = redis_failover.signature(view, plan.settling)
    else:
        view = pg_view(fleet, plan.cluster)
        now = pg_plans.signature(view, plan.settling, plan.rejoining)
    if now != plan.signature:
        raise Refused(
            view.state,
            f"refused: the state changed since the plan was made ({what_changed(plan.signature, now)})",
            "run the command again to see the new plan",
        )


def what_changed(before: tuple[Any, ...], now: tuple[Any, ...]) -> str:
    """The parts of a plan's signature that differ now: what was, then what is."""
    if len(before) != len(now):
        return "no earlier state to compare"
    differences = []
    for was, is_now in zip(before, now, strict=True):
        if was == is_now:
            continue
        if isinstance(was, tuple) and isinstance(is_now, tuple):
            gone = [item for item in was if item not in is_now]
            new = [item for item in is_now if item not in was]
            differences.append(f"was {gone}, now {new}")
        else:
            differences.append(f"was {was!r}, now {is_now!r}")
    return "; ".join(differences)[:500]


def describe_plan(plan: PgPlan | RedisPlan) -> dict[str, Any]:
    """The plan as data for --json: everything but the actions' internals."""
    internals = ("actions", "failure_hint", "signature", "settling", "rejoining")
    data = {key: value for key, value in plan.__dict__.items() if key not in internals}
    data["steps"] = plan.steps()
    return data
