"""`igops pg`: Postgres clusters behind PgBouncer — status, switchover, failover, rejoin, and
`pg archive` (WAL archiving, igops.commands.pg_archive)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer

from igops import failover
from igops.commands import pg_archive
from igops.commands.common import DRY_RUN_OPTION, JSON_OPTION, WATCH_OPTION, YES_OPTION, command, load_fleet, present
from igops.commands.role_change_flow import planned, run_plan
from igops.errors import ExitCode
from igops.host_commands import parallel_map
from igops.operations import conflicts
from igops.output import Output, plural
from igops.tables import Column

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.pg.actions import PgResult
    from igops.pg.cluster import PgClusterState, PgNode
    from igops.pg.plans import PgPlan

# Its help, which `igops --help` lists too, is in igops.command_table.COMMANDS.
app = typer.Typer(no_args_is_help=True)
app.add_typer(pg_archive.app, name="archive")

SWITCHOVER_RISK_OPTION = typer.Option(
    False,
    "--accept-risk",
    help="Go ahead despite what the preflight refuses (a lagging standby, WAL replay paused, a volume short of "
    "space, an interrupted switchover's WAL end unknown): the plan names each risk accepted.",
)
FAILOVER_RISK_OPTION = typer.Option(
    False,
    "--accept-risk",
    help="Go ahead despite what the preflight refuses (an old primary that cannot be fenced on disk or is hung, "
    "a standby behind the most advanced one, WAL the candidate lacks): the plan names each risk accepted.",
)
# At 80 columns the node, its role and LSN stay whole; repmgr's view and the standby's own LSNs
# give way first (`--wide` shows them).
NODE_COLUMNS: list[Column | str] = [
    "node",
    "role",
    Column("state", wrap=True),
    "TL",
    "LSN",
    Column("received", drop=3),
    Column("replayed", drop=3),
    Column("lag", wrap=True),
    Column("streams from", drop=2),
    Column("repmgr", wrap=True, drop=4),
    Column("PgBouncer", wrap=True, drop=1),
]


def _lag(node: PgNode) -> str | None:
    if node.lag_bytes is None:
        return None
    text = f"{node.lag_bytes} B"
    if node.lag_s is not None:
        text += f", {node.lag_s:.1f} s"
    return text + (" (replay paused)" if node.replay_paused else "")


def _repmgr(node: PgNode, state: PgClusterState) -> str | None:
    """repmgr's record, and repmgrd's state where any member runs it."""
    if not any(member.repmgrd in ("running", "paused") for member in state.nodes) or node.repmgrd is None:
        return node.repmgr
    return f"{node.repmgr or '-'}; repmgrd {node.repmgrd}"


def _state(node: PgNode) -> str:
    # Every standby holds standby.signal: "fenced" is news only on a member that is not one.
    text = node.state + (" (fenced)" if node.fenced and node.role != "standby" else "")
    return text + (f", {node.control_state}" if node.control_state else "")


def show_state(out: Output, state: PgClusterState) -> None:
    out.table(
        f"cluster {state.cluster}: primary {state.primary or 'NONE'}",
        NODE_COLUMNS,
        [
            [
                node.name,
                node.role,
                _state(node),
                node.timeline,
                node.lsn,
                node.received_lsn,
                node.replayed_lsn,
                _lag(node),
                node.streaming_from,
                _repmgr(node, state),
                node.pgbouncer,
            ]
            for node in state.nodes
        ],
    )
    for problem in state.problems:
        fix = state.fixes.get(problem)
        out.text(f"  ! {problem}" + (f"\n      to resolve: {fix}" if fix else ""))


def run_pg_plan(
    out: Output,
    fleet: Fleet,
    plan: PgPlan,
    before: PgClusterState,
    dry_run: bool,
    yes: bool,
    params: dict[str, Any],
) -> None:
    def summary(result: PgResult) -> str:
        if plan.operation == "rebuild":
            return f"done: {plan.title[0].lower()}{plan.title[1:]}"
        text = f"{plan.operation} done: {result.new_primary} is the primary of {result.cluster}"
        if result.write_pause_ms is not None:
            text += f"; writes were held {result.write_pause_ms:.0f} ms"
        if plan.operation == "failover":
            text += "; bytes at risk (old primary's WAL the new one never received): " + (
                str(result.bytes_at_risk) if result.bytes_at_risk is not None else "unknown"
            )
        if result.not_followed:
            text += f"; left out of the follow, as they cannot follow {result.new_primary}: " + ", ".join(
                f"`igops pg rejoin {name}`" for name in result.not_followed
            )
        return text

    run_plan(
        out,
        fleet,
        plan,
        before,
        dry_run=dry_run,
        yes=yes,
        show_state=show_state,
        read_state=lambda: failover.pg_status(fleet, plan.cluster),
        apply=failover.apply_pg,
        kind=f"pg-{plan.operation}",
        resources=[conflicts.pg_cluster(plan.cluster)],
        members=failover.cluster_members(fleet, plan.cluster),
        params=params,
        outcome=lambda r: (f"{r.operation}: {r.new_primary} is the primary of {r.cluster}", 0),
        summary=summary,
        nothing_to_do="nothing to do",
    )


def _planned(
    out: Output, step_title: str, planner: Callable[[], tuple[PgPlan, PgClusterState]]
) -> tuple[PgPlan, PgClusterState]:
    return planned(out, step_title, planner, show_state)


@app.command("status")
def status(
    ctx: typer.Context,
    cluster: str | None = typer.Argument(None, help="One cluster (default: all of them)."),
    json_flag: bool = JSON_OPTION,
    watch: float | None = WATCH_OPTION,
) -> None:
    """Every node's role, state, timeline, LSNs and lag, repmgr's view, and where PgBouncer routes."""

    with command(ctx, "pg status", json_flag) as out:
        fleet = load_fleet(ctx)
        names = [cluster] if cluster else list(fleet.model.postgres.clusters)
        for name in names:
            failover.cluster_members(fleet, name)

        def show() -> tuple[dict[str, Any], int]:
            states = parallel_map(lambda name: failover.pg_status(fleet, name), names)
            for state in states:
                show_state(out, state)
            problems = [f"{state.cluster}: {problem}" for state in states for problem in state.problems]
            out.text("every cluster healthy" if not problems else plural(len(problems), "problem"))
            return {"clusters": states, "problems": problems}, ExitCode.OK if not problems else ExitCode.PROBLEMS_FOUND

        present(out, show, watch)


@app.command("switchover")
def switchover(
    ctx: typer.Context,
    cluster: str = typer.Argument(..., help="The cluster, e.g. main."),
    to: str = typer.Option(..., "--to", help="The standby to promote."),
    accept_risk: bool = SWITCHOVER_RISK_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Planned: pause PgBouncer, stop the primary cleanly, promote the standby once it has all the
    WAL, repoint PgBouncer, resume, and rejoin the old primary as a standby. Nothing is lost."""

    with command(ctx, "pg switchover", json_flag) as out:
        fleet = load_fleet(ctx)
        plan, before = _planned(
            out,
            f"read cluster {cluster}'s state and check {to}",
            lambda: failover.plan_pg_switchover(fleet, cluster, to, accept_risk),
        )
        run_pg_plan(out, fleet, plan, before, dry_run, yes, {"cluster": cluster, "to": to, "accept_risk": accept_risk})


@app.command("failover")
def failover_command(
    ctx: typer.Context,
    cluster: str = typer.Argument(..., help="The cluster whose primary is down."),
    to: str | None = typer.Option(
        None,
        "--to",
        help="The standby to promote (default: the one with the most WAL received, then repmgr's priority).",
    ),
    accept_risk: bool = FAILOVER_RISK_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Unplanned: confirm the primary is down, fence it (PgBouncer away from it, standby.signal on its
    disk), promote the best standby, repoint PgBouncer, and report the bytes at risk."""

    with command(ctx, "pg failover", json_flag) as out:
        fleet = load_fleet(ctx)
        plan, before = _planned(
            out,
            f"confirm cluster {cluster}'s primary is down and choose a standby",
            lambda: failover.plan_pg_failover(fleet, cluster, to, accept_risk),
        )
        run_pg_plan(out, fleet, plan, before, dry_run, yes, {"cluster": cluster, "to": to, "accept_risk": accept_risk})


@app.command("rejoin")
def rejoin(
    ctx: typer.Context,
    node: str = typer.Argument(..., help="A former primary (or a standby that lost its upstream)."),
    accept_risk: bool = typer.Option(
        False,
        "--accept-risk",
        help="Rejoin a node that still accepts writes, or whose postmaster runs but does not answer: it is stopped "
        "and rewound, and whatever it took after the timelines forked is discarded. The plan names each risk "
        "accepted.",
    ),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Bring a node back as a standby of its cluster's primary (pg_rewind when its WAL diverged)."""

    with command(ctx, "pg rejoin", json_flag) as out:
        fleet = load_fleet(ctx)
        plan, before = _planned(
            out, f"read the state of {node}'s cluster", lambda: failover.plan_pg_rejoin(fleet, node, accept_risk)
        )
        run_pg_plan(out, fleet, plan, before, dry_run, yes, {"node": node, "accept_risk": accept_risk})
