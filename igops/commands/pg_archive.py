"""`igops pg archive`: continuous WAL archiving with pgBackRest — set it up, see how it does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from igops.commands.common import DRY_RUN_OPTION, JSON_OPTION, YES_OPTION, command, load_fleet, mutate, present
from igops.errors import ExitCode, UsageError
from igops.operations import conflicts
from igops.output import Output, plural
from igops.pg import archive, archive_actions, archive_status
from igops.tables import Column

if TYPE_CHECKING:
    from igops.inventory import Fleet

app = typer.Typer(
    help="Continuous WAL archiving with pgBackRest: set it up on a cluster, see how it keeps up.",
    no_args_is_help=True,
)

CLUSTER_ARGUMENT = typer.Argument(None, help="The cluster (default: the only one; required when there are several).")


def _cluster(fleet: Fleet, cluster: str | None) -> str:
    clusters = list(fleet.model.postgres.clusters)
    if cluster:
        return cluster
    if len(clusters) == 1:
        return clusters[0]
    raise UsageError("name the cluster", f"one of: {', '.join(clusters) or 'none in [postgres.clusters]'}")


def _show_members(out: Output, plan: archive.ArchivePlan) -> None:
    out.table(
        f"cluster {plan.cluster}: primary {plan.primary}, stanza {plan.stanza}",
        ["node", "role", "pgBackRest", "config", "archive_mode", Column("archive_command", wrap=True, drop=1)],
        [
            [
                member.name,
                member.role,
                member.pgbackrest,
                "current" if member.config_current else "to write",
                member.running.get("archive_mode"),
                member.running.get("archive_command"),
            ]
            for member in plan.members
        ],
    )


@app.command("setup")
def setup(
    ctx: typer.Context,
    cluster: str | None = CLUSTER_ARGUMENT,
    restart_primary: bool = typer.Option(
        False,
        "--restart-primary",
        help="Restart the primary too if archive_mode needs it, with writes paused in PgBouncer meanwhile "
        "(otherwise switch over to a restarted standby first).",
    ),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Configure pgBackRest on every member, set archive_command, archive_timeout and archive_mode,
    restart where archive_mode needs it, create the stanza and prove archiving works (pgbackrest
    check). Only what differs is done: a second run does nothing."""

    with command(ctx, "pg archive setup", json_flag) as out:
        fleet = load_fleet(ctx)
        name = _cluster(fleet, cluster)
        with out.step(f"read cluster {name}'s members: pgBackRest, its configuration, the archive settings"):
            plan = archive.plan_archive_setup(fleet, name, restart_primary)
        _show_members(out, plan)
        if not plan.actions:
            out.text(plan.notes[0])
            out.finish({"plan": plan, "changed": False})
            return
        result = mutate(
            out,
            fleet,
            kind="pg-archive-setup",
            resources=[conflicts.pg_cluster(name)],
            targets=[member.name for member in plan.members],
            title=plan.title,
            steps=plan.steps(),
            dry_run=dry_run,
            yes=yes,
            action=lambda reporter: archive_actions.apply_archive_setup(fleet, plan, reporter),
            params={"cluster": name, "restart_primary": restart_primary},
            notes=plan.notes,
        )
        if result is None:
            out.finish({"dry_run": dry_run, "plan": plan})
            return
        if "check" in [step.action for step in plan.actions]:
            out.text(f"cluster {name} archives to stanza {plan.stanza} (pgbackrest check passed on {plan.primary})")
        else:
            out.text(f"the standbys of {name} are set up; {plan.primary} waits for its restart (see the note above)")
        out.finish({"plan": plan, "result": result, "changed": True})


def _age(seconds: float | None) -> str | None:
    return None if seconds is None else f"{seconds:.0f} s ago"


def _size(value: int | None) -> str:
    return "unknown" if value is None else f"{value / (1 << 20):.1f} MiB"


@app.command("status")
def status(
    ctx: typer.Context,
    cluster: str | None = CLUSTER_ARGUMENT,
    json_flag: bool = JSON_OPTION,
) -> None:
    """The primary's archiver (last segment archived and its age, failures), the WAL waiting to be
    archived, and the repository's archive range and size. Exits 5 when archiving falls behind or
    fails."""

    with command(ctx, "pg archive status", json_flag) as out:
        fleet = load_fleet(ctx)
        name = _cluster(fleet, cluster)
        archive.archive_settings(fleet)

        def show() -> tuple[dict[str, Any], int]:
            state = archive_status.archive_status(fleet, name)
            stats = state.archiver
            out.table(
                f"cluster {name}: primary {state.primary}, stanza {state.stanza}",
                ["", Column("value", wrap=True)],
                [
                    ["archive_mode", f"{stats.archive_mode} (archive_timeout {state.archive_timeout} s)"],
                    ["archived", f"{stats.archived_count} segments"],
                    [
                        "last archived",
                        f"{stats.last_archived_wal or '-'} ({_age(stats.last_archived_age_s) or 'never'})",
                    ],
                    ["failed", f"{stats.failed_count} times"],
                    ["last failed", f"{stats.last_failed_wal or '-'} ({_age(stats.last_failed_age_s) or 'never'})"],
                    ["current WAL", stats.current_wal],
                    [
                        "waiting",
                        f"{'?' if state.ready_files is None else state.ready_files} .ready segments"
                        + (f", the oldest {oldest}" if (oldest := _age(state.oldest_ready_age_s)) else "")
                        + f"; spool {_size(state.spool_bytes)}",
                    ],
                    ["repository", f"{state.repository.status}; {_size(state.repository_bytes)}"],
                    *[
                        [f"archive {item.database}", f"{item.min_wal or '-'} .. {item.max_wal or '-'}"]
                        for item in state.repository.ranges
                    ],
                ],
            )
            for problem in state.problems:
                out.text(f"  ! {problem}")
            out.text("archiving keeps up" if not state.problems else plural(len(state.problems), "problem"))
            return {"status": state}, ExitCode.OK if not state.problems else ExitCode.PROBLEMS_FOUND

        present(out, show)
