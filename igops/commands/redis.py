"""`igops redis`: the Redis master and its replicas — status, switchover, failover, rejoin."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer

from igops import failover
from igops.commands.common import DRY_RUN_OPTION, JSON_OPTION, WATCH_OPTION, YES_OPTION, command, load_fleet, present
from igops.commands.role_change_flow import planned, run_plan
from igops.errors import ExitCode
from igops.operations import conflicts
from igops.output import Output, plural
from igops.tables import Column

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.redis_failover import RedisPlan, RedisResult
    from igops.redis_tier import RedisState

# Its help, which `igops --help` lists too, is in igops.command_table.COMMANDS.
app = typer.Typer(no_args_is_help=True)

SWITCHOVER_RISK_OPTION = typer.Option(
    False,
    "--accept-risk",
    help="Go ahead despite what the preflight refuses (a replica that lags, does not follow the master over a "
    "live link, or accepts writes): the plan names each risk accepted.",
)
FAILOVER_RISK_OPTION = typer.Option(
    False,
    "--accept-risk",
    help="Go ahead despite what the preflight refuses (an old master that is hung or cannot be fenced, a replica "
    "behind the most advanced one): the plan names each risk accepted.",
)
# One lock for every Redis operation: the fleet has one master.


def show_state(out: Output, state: RedisState) -> None:
    out.table(
        f"redis: the app writes to {state.app_master or state.app_address or 'NOTHING'}"
        + (f" (directory version {state.endpoint_version})" if state.endpoint_version else ""),
        [
            "node",
            "address",
            "role",
            Column("state", wrap=True),
            "offset",
            "lag",
            Column("master", drop=2),
            Column("link", drop=1),
            Column("priority", drop=3),
            Column("app uses", drop=2),
        ],
        [
            [
                node.name,
                node.address,
                node.role,
                node.state,
                node.offset,
                f"{node.lag_bytes} B" if node.lag_bytes is not None else None,
                node.master,
                node.link,
                node.priority,
                node.app_master,
            ]
            for node in state.nodes
        ],
    )
    for problem in state.problems:
        out.text(f"  ! {problem}")


def _planned(
    out: Output, step_title: str, planner: Callable[[], tuple[RedisPlan, RedisState]]
) -> tuple[RedisPlan, RedisState]:
    return planned(out, step_title, planner, show_state)


def _run(
    out: Output,
    fleet: Fleet,
    plan: RedisPlan,
    before: RedisState,
    dry_run: bool,
    yes: bool,
    params: dict[str, Any],
) -> None:
    def summary(result: RedisResult) -> str:
        text = f"{plan.operation} done: the app writes to {result.new_master}"
        if result.write_pause_ms is not None:
            text += f"; writes were held {result.write_pause_ms:.0f} ms"
        return text

    run_plan(
        out,
        fleet,
        plan,
        before,
        dry_run=dry_run,
        yes=yes,
        show_state=show_state,
        read_state=lambda: failover.redis_status(fleet),
        apply=failover.apply_redis,
        kind=f"redis-{plan.operation}",
        resources=[conflicts.REDIS],
        members=failover.redis_members(fleet),
        params=params,
        outcome=lambda r: (f"{r.operation}: the app writes to {r.new_master}", 0),
        summary=summary,
        nothing_to_do=plan.title,
    )


@app.command("status")
def status(ctx: typer.Context, json_flag: bool = JSON_OPTION, watch: float | None = WATCH_OPTION) -> None:
    """Role, offset, lag and link of every node, and the master the app uses (the directory's)."""

    with command(ctx, "redis status", json_flag) as out:
        fleet = load_fleet(ctx)

        def show() -> tuple[RedisState, int]:
            state = failover.redis_status(fleet)
            show_state(out, state)
            out.text("healthy" if not state.problems else plural(len(state.problems), "problem"))
            return state, ExitCode.OK if not state.problems else ExitCode.PROBLEMS_FOUND

        present(out, show, watch)


@app.command("switchover")
def switchover(
    ctx: typer.Context,
    to: str = typer.Option(..., "--to", help="The replica to make the master."),
    accept_risk: bool = SWITCHOVER_RISK_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Planned: pause writes on the master, wait until the replica has everything, swap the roles,
    point the app at the new master, unpause. No acknowledged write is lost."""

    with command(ctx, "redis switchover", json_flag) as out:
        fleet = load_fleet(ctx)
        plan, before = _planned(
            out,
            f"read every node's replication state and check {to}",
            lambda: failover.plan_redis_switchover(fleet, to, accept_risk),
        )
        _run(out, fleet, plan, before, dry_run, yes, {"to": to, "accept_risk": accept_risk})


@app.command("failover")
def failover_command(
    ctx: typer.Context,
    to: str | None = typer.Option(None, "--to", help="The replica to promote (default: the highest offset)."),
    accept_risk: bool = FAILOVER_RISK_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Unplanned: confirm the master is down, fence it (its config makes it a replica on restart),
    promote the replica with the highest offset, point the app at it."""

    with command(ctx, "redis failover", json_flag) as out:
        fleet = load_fleet(ctx)
        plan, before = _planned(
            out,
            "confirm the master is down and choose a replica",
            lambda: failover.plan_redis_failover(fleet, to, accept_risk),
        )
        _run(out, fleet, plan, before, dry_run, yes, {"to": to, "accept_risk": accept_risk})


@app.command("rejoin")
def rejoin(
    ctx: typer.Context,
    node: str = typer.Argument(..., help="A former master, or a replica of the wrong master."),
    accept_risk: bool = typer.Option(
        False,
        "--accept-risk",
        help="Rejoin a node that is still a master: it becomes a replica, and the writes it took since it split off "
        "are discarded. The plan names the risk accepted.",
    ),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Make a node a replica of the app's master, in memory and in its config file."""

    with command(ctx, "redis rejoin", json_flag) as out:
        fleet = load_fleet(ctx)
        plan, before = _planned(
            out,
            f"read every node's replication state and {node}'s config",
            lambda: failover.plan_redis_rejoin(fleet, node, accept_risk),
        )
        _run(out, fleet, plan, before, dry_run, yes, {"node": node, "accept_risk": accept_risk})
