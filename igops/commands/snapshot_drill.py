"""`igops snapshot drill`: a point-in-time restore onto a scratch host, checked and taken away
(igops.snapshot_drill). Registered on the snapshot app by igops.commands.snapshot."""

from __future__ import annotations

import typer

from igops.commands.common import DRY_RUN_OPTION, JSON_OPTION, YES_OPTION, command, exit_with, load_fleet, mutate
from igops.ebs import Ebs
from igops.errors import ExitCode


def drill(
    ctx: typer.Context,
    source: str = typer.Argument(..., metavar="CLUSTER|HOST", help="The Postgres cluster, or a member of it."),
    onto: str = typer.Option(
        ..., "--onto", metavar="HOST", help="The scratch host to restore onto (never one that runs a primary)."
    ),
    to_time: str | None = typer.Option(
        None, "--to", metavar="TIME", help="Recover to this time instead of a random one of the retained range."
    ),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Restore the cluster to a point in time onto a scratch host, check the copy (pg_amcheck,
    rows per shard), measure the time it took, take it away, and record the outcome for igops check."""
    from igops import snapshot_drill

    with command(ctx, "snapshot drill", json_flag) as out:
        fleet = load_fleet(ctx)
        fleet.host(onto)
        ebs = Ebs(fleet)
        plan = snapshot_drill.plan_drill(fleet, ebs, source, onto, to_time)
        result = mutate(
            out,
            fleet,
            kind=snapshot_drill.KIND,
            resources=plan.resources(),
            targets=[onto],
            title=f"Drill: restore {plan.cluster} to {plan.target.describe()}"
            + (" (chosen at random)" if plan.chosen_at_random else "")
            + f" onto {onto} from group {plan.restore.group_id}",
            steps=plan.steps(),
            dry_run=dry_run,
            yes=yes,
            action=lambda reporter: snapshot_drill.run_drill(fleet, ebs, plan, reporter),
            outcome=lambda r: (
                f"drill {'passed' if r.passed else 'FAILED'}: RTO {r.rto_s} s"
                + ("; " + "; ".join(r.problems) if r.problems else ""),
                0 if r.passed else ExitCode.PROBLEMS_FOUND,
            ),
        )
        if result is None:
            out.finish({"dry_run": dry_run, "plan": plan})
            return
        out.table(
            f"drill of {result.cluster}: {'passed' if result.passed else 'FAILED'}",
            ["shard", "rows in the copy", "rows in the source"],
            [[schema, counts["copy"], counts["source"]] for schema, counts in result.shards.items()],
        )
        out.finish(result)
        if not result.passed:
            exit_with(ExitCode.PROBLEMS_FOUND)
