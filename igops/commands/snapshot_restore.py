"""`igops snapshot restore`: a group onto a host, to the group's instant or to a point in time
from the WAL archive (docs/pitr.md); or `--cleanup`. Registered on the snapshot app by
igops.commands.snapshot."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from igops import restore as restoring, restore_target
from igops.commands.common import DRY_RUN_OPTION, JSON_OPTION, YES_OPTION, command, load_fleet, mutate
from igops.ebs import Ebs
from igops.errors import UsageError
from igops.operations import conflicts
from igops.tables import Column

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.output import Output


def restore(
    ctx: typer.Context,
    source: str = typer.Argument(
        ...,
        metavar="GROUP|HOST|CLUSTER",
        help="A complete group id; or, with a target, a Postgres member or cluster (the newest group that reaches it).",
    ),
    onto: str = typer.Option(
        ..., "--onto", metavar="HOST", help="The host to restore onto (never one that runs a primary)."
    ),
    to_time: str | None = typer.Option(
        None,
        "--to",
        metavar="TIME",
        help="Point in time to recover to, 'YYYY-MM-DD HH:MM:SS' (UTC unless it names a zone).",
    ),
    lsn: str | None = typer.Option(None, "--lsn", metavar="LSN", help="WAL position to recover to, e.g. 16/B374D848."),
    latest: bool = typer.Option(False, "--latest", help="Recover to the end of the archived WAL."),
    at: str | None = typer.Option(
        None, "--at", help="Mount under this directory (default from the inventory; '/' mounts at the original paths)."
    ),
    port: int = typer.Option(
        5499, "--port", min=1, max=65535, help="Port of the restored Postgres (it listens on its own socket only)."
    ),
    warm_from: str | None = typer.Option(
        None,
        "--warm-from",
        metavar="HOST",
        help="Once it runs, warm the copy's page cache like this member's (igops warm copy).",
    ),
    in_place: bool = typer.Option(
        False,
        "--in-place",
        help="Rebuild the standby --onto names from the group: its volumes swapped for the group's at the same "
        "mounts (the old ones kept, detached), then a standby of the primary again. Needs --yes.",
    ),
    cleanup: bool = typer.Option(
        False, "--cleanup", help="Take the restore away: stop its Postgres, unmount, detach and delete its volumes."
    ),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Create volumes from a group, mount them and start its Postgres, to the group's instant or
    (--to, --lsn, --latest) to a point in time from the WAL archive; or --cleanup."""

    with command(ctx, "snapshot restore", json_flag) as out:
        fleet = load_fleet(ctx)
        if to_time and to_time in fleet.hosts_by_name:
            raise UsageError(
                f"--to takes the point in time to recover to, not a host ({to_time})",
                f"name the host to restore onto with --onto {to_time}",
            )
        fleet.host(onto)
        if in_place:
            _rebuild(ctx, out, fleet, source, onto, dry_run, yes, given=[to_time, lsn, at, warm_from, cleanup])
            return
        ebs = Ebs(fleet)
        if cleanup:
            undo = restoring.plan_cleanup(fleet, ebs, source, onto)
            deleted = mutate(
                out,
                fleet,
                kind="snapshot-restore",
                resources=[conflicts.host(onto)],
                targets=[onto],
                title=f"Take away the restore of {source} from {onto}",
                steps=undo.steps(),
                dry_run=dry_run,
                yes=yes,
                action=lambda reporter: restoring.cleanup(fleet, ebs, undo, reporter),
            )
            out.finish({"dry_run": dry_run, "plan": undo, "deleted": deleted or []})
            return
        target = restore_target.parse_target(to_time, lsn, latest) if (to_time or lsn or latest) else None
        if target and (source in fleet.hosts_by_name or source in fleet.model.postgres.clusters):
            plan = restoring.plan_point_in_time(fleet, ebs, source, target, onto, at, port)
        else:
            plan = restoring.plan_restore(fleet, ebs, source, onto, at, port, target)
        if warm_from:
            plan = restoring.warm_from(fleet, plan, warm_from)
        result = mutate(
            out,
            fleet,
            kind="snapshot-restore",
            resources=plan.resources(),
            targets=[onto],
            title=f"Restore group {plan.group_id} onto {onto}"
            + (f", recovered to {plan.recovery.target.describe()}" if plan.recovery else ""),
            steps=plan.steps(),
            dry_run=dry_run,
            yes=yes,
            action=lambda reporter: restoring.restore(fleet, ebs, plan, reporter),
        )
        if result is None:
            out.finish({"dry_run": dry_run, "plan": plan})
            return
        out.table(None, ["mount", "restored at"], [[m, p] for m, p in result.mounted.items()])
        if result.reached:
            reached = result.reached
            out.table(
                "recovered to",
                ["target", "WAL reached", Column("last transaction", wrap=True), Column("replayed", drop=1)],
                [[reached["target"], reached["redo_done"], reached["last_transaction"], reached["replayed_bytes"]]],
            )
        if result.warmed and "error" in result.warmed:
            out.log(f"warming from {result.warmed['from']} failed: {result.warmed['error']}; the copy is up, only cold")
        elif result.warmed:
            out.log(
                f"warmed from {result.warmed['from']}: {result.warmed['warmed_pages']} pages, "
                f"{result.warmed['hit_ratio']:.0%} of the profile resident"
            )
        if result.postgres:
            out.log(f"Postgres is running on the restored data: {result.postgres['psql']}")
        out.finish(result)


def _rebuild(
    ctx: typer.Context, out: Output, fleet: Fleet, source: str, onto: str, dry_run: bool, yes: bool, given: list[Any]
) -> None:
    """--in-place: a Postgres plan (igops.restore_in_place), run as `igops pg` runs its own, under
    the group's lease too."""
    from igops import failover, restore_in_place
    from igops.commands.pg import show_state
    from igops.commands.role_change_flow import planned, run_plan

    if any(given):
        raise UsageError(
            "--in-place rebuilds a standby to follow its primary: it takes no --to, --lsn, --at, --warm-from or "
            "--cleanup",
            f"igops snapshot restore {source} --onto {onto} --in-place --yes",
        )
    if not yes and not dry_run:
        raise UsageError(
            f"--in-place replaces {onto}'s data volumes: it runs only with --yes",
            f"see the plan with --dry-run, then: igops snapshot restore {source} --onto {onto} --in-place --yes",
        )
    ebs = Ebs(fleet)
    plan, before = planned(
        out,
        f"read the state of {onto}'s cluster and mounts",
        lambda: restore_in_place.plan_rebuild(fleet, ebs, source, onto),
        show_state,
    )
    run_plan(
        out,
        fleet,
        plan,
        before,
        dry_run=dry_run,
        yes=yes,
        show_state=show_state,
        read_state=lambda: failover.pg_status(fleet, plan.cluster),
        apply=restore_in_place.apply,
        kind="pg-rebuild",
        resources=restore_in_place.resources(plan),
        members=failover.cluster_members(fleet, plan.cluster),
        params={"group": plan.group, "node": onto},
        outcome=lambda r: (f"{r.operation}: {r.new_primary} is the primary of {r.cluster}", 0),
        summary=lambda _: f"done: {plan.title[0].lower()}{plan.title[1:]}",
        nothing_to_do="nothing to do",
    )
