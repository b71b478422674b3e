"""`igops snapshot`: consistent XFS-freeze EBS snapshot groups."""

from __future__ import annotations

from datetime import timedelta
from typing import List, Optional

import typer

from igops.commands.common import DRY_RUN_OPTION, JSON_OPTION, YES_OPTION, command, load_fleet, mutate
from igops.output import plural

app = typer.Typer(help="Consistent EBS snapshots of frozen XFS filesystems: create, list, prune, restore.",
                  no_args_is_help=True)


def _group_row(group) -> list:
    return [group.group_id, group.host, group.mounts, f"{group.volumes}/{group.expected}", group.state,
            f"{group.created:%Y-%m-%d %H:%M:%S}", f"{group.size_gib} GiB",
            f"{group.freeze_ms:.0f} ms" if group.freeze_ms is not None else None]


GROUP_COLUMNS = ["group", "host", "mounts", "volumes", "state", "created (UTC)", "size", "freeze"]


@app.command("create")
def create(
    ctx: typer.Context,
    host: str = typer.Argument(..., help="The host whose data filesystems to snapshot."),
    mount: Optional[List[str]] = typer.Option(None, "--mount", "-m",
                                              help="A mount point (repeatable; default: the host's data mounts)."),
    deadline: Optional[float] = typer.Option(None, "--deadline", min=1, max=120,
                                             help="Hard thaw deadline in seconds (default from the inventory, 10)."),
    hook: bool = typer.Option(True, "--hook/--no-hook", help="Run the role's pre-freeze hook."),
    allow_primary: bool = typer.Option(False, "--allow-primary",
                                       help="Freeze a live Postgres primary (its writes stall until the thaw); "
                                            "refused otherwise: snapshot a standby."),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Freeze the host's filesystems, snapshot every volume under them at once, thaw, tag."""
    from igops import snapshot

    with command(ctx, "snapshot create", json_flag) as out:
        relative = [path for path in mount or [] if not path.startswith("/")]
        if relative:
            from igops.errors import UsageError

            raise UsageError(f"--mount {relative[0]!r} is not an absolute path",
                             "name the mount point from the root, e.g. --mount /data")
        fleet = load_fleet(ctx)
        with out.step(f"discover the volumes under {host}'s mounts"):
            plan = snapshot.plan_create(fleet, host, mount, deadline=deadline, hook=hook, allow_primary=allow_primary)
        try:
            result = mutate(out, fleet, operation="snapshot-create", target=host, targets=[host],
                            title=f"Snapshot group {plan.group_id}: {plural(len(plan.volumes), 'volume')} under "
                                  f"{', '.join(plan.mounts)} on {host}",
                            steps=plan.steps(), dry_run=dry_run, yes=yes,
                            action=lambda: snapshot.create(fleet, plan, out),
                            outcome=lambda r: (f"group {r.group_id} complete, freeze {r.freeze_window_ms:.0f} ms", 0))
        except snapshot.SnapshotFailed as failed:
            out.table(None, ["group", "state", "freeze window", "error"],
                      [[failed.result.group_id, failed.result.state, failed.result.freeze_window_ms, failed.result.error]])
            raise
        if result is None:
            out.finish({"dry_run": dry_run, "plan": plan})
            return
        out.table(None, ["group", "state", "volumes", "freeze window", "thawed by"],
                  [[result.group_id, result.state, len(result.snapshots), f"{result.freeze_window_ms:.0f} ms",
                    result.thawed_by]])
        out.finish(result)


@app.command("list")
def list_groups(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, "--host", "-H", help="Only this host's groups."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """Snapshot groups, newest first."""
    from igops import snapshot
    from igops.ebs import Ebs

    with command(ctx, "snapshot list", json_flag) as out:
        fleet = load_fleet(ctx)
        if host:
            fleet.host(host)
        found = snapshot.groups(Ebs(fleet), host)
        out.table(f"{len(found)} snapshot groups", GROUP_COLUMNS, [_group_row(g) for g in found])
        out.finish({"groups": [{k: v for k, v in g.__dict__.items() if k != "snapshots"} for g in found]})


@app.command("show")
def show(
    ctx: typer.Context,
    group: str = typer.Argument(..., help="A group id from `igops snapshot list`."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """One group: its snapshots, their volumes, mounts, devices and RAID order."""
    from igops import snapshot
    from igops.ebs import Ebs, tags_of

    with command(ctx, "snapshot show", json_flag) as out:
        fleet = load_fleet(ctx)
        found = snapshot.find_group(Ebs(fleet), group)
        out.table(None, GROUP_COLUMNS, [_group_row(found)])
        rows = []
        for item in found.snapshots:
            tags = tags_of(item)
            rows.append([item["SnapshotId"], item["VolumeId"], tags.get(snapshot.TAG_MOUNT),
                         tags.get(snapshot.TAG_DEVICE), tags.get(snapshot.TAG_RAID_INDEX), item["State"],
                         f"{item.get('VolumeSize', 0)} GiB"])
        out.table("snapshots", ["snapshot", "volume", "mount", "device", "RAID #", "state", "size"], rows)
        out.finish({"group": found})


@app.command("prune")
def prune(
    ctx: typer.Context,
    keep_last: int = typer.Option(0, "--keep-last", min=0, help="Keep the N newest complete groups per host."),
    keep_hourly: int = typer.Option(0, "--keep-hourly", min=0, help="Keep the newest group of each of the last N hours with one."),
    keep_daily: int = typer.Option(0, "--keep-daily", min=0, help="… of each of the last N days."),
    keep_weekly: int = typer.Option(0, "--keep-weekly", min=0, help="… of each of the last N ISO weeks."),
    host: Optional[str] = typer.Option(None, "--host", "-H", help="Only this host's groups."),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Delete old groups. Only complete groups count; a host's newest complete group is never deleted."""
    from igops import snapshot
    from igops.ebs import Ebs

    with command(ctx, "snapshot prune", json_flag) as out:
        fleet = load_fleet(ctx)
        ebs = Ebs(fleet)
        plan = snapshot.plan_prune(snapshot.groups(ebs, host),
                                   snapshot.Retention(keep_last, keep_hourly, keep_daily, keep_weekly),
                                   grace=timedelta(minutes=fleet.model.snapshot.stale_after_minutes))
        deleted = []
        if plan.delete:
            deleted = mutate(out, fleet, operation="snapshot-prune", target=host or "all", targets=[host or "all"],
                             title=f"Delete {len(plan.delete)} snapshot groups, keep {len(plan.keep)}",
                             steps=plan.steps(), dry_run=dry_run, yes=yes,
                             action=lambda: snapshot.prune(ebs, plan, out),
                             outcome=lambda done: (f"deleted {plural(len(done), 'group')}", 0))
        else:
            out.log("nothing to delete")
        out.table(None, ["group", "kept because"], [[group_id, reasons] for group_id, reasons in plan.keep.items()])
        out.finish({"dry_run": dry_run, "keep": plan.keep, "delete": [g.group_id for g in plan.delete],
                    "deleted": deleted or []})


@app.command("restore")
def restore(
    ctx: typer.Context,
    group: str = typer.Argument(..., help="A complete group id."),
    to: str = typer.Option(..., "--to", help="The host to restore onto."),
    at: Optional[str] = typer.Option(None, "--at", help="Mount under this directory (default from the inventory; "
                                                        "'/' mounts at the original paths)."),
    port: int = typer.Option(5499, "--port", min=1, max=65535,
                             help="Port of the restored Postgres (it listens on its own socket only)."),
    cleanup: bool = typer.Option(False, "--cleanup", help="Take the restore away: stop its Postgres, unmount, "
                                                          "detach and delete its volumes."),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Create volumes from a group, attach them in RAID order, mount them and start its Postgres; or --cleanup."""
    from igops import restore as restoring
    from igops.ebs import Ebs

    with command(ctx, "snapshot restore", json_flag) as out:
        fleet = load_fleet(ctx)
        ebs = Ebs(fleet)
        if cleanup:
            undo = restoring.plan_cleanup(fleet, ebs, group, to)
            deleted = mutate(out, fleet, operation="snapshot-restore", target=to, targets=[to],
                             title=f"Take away the restore of {group} from {to}", steps=undo.steps(),
                             dry_run=dry_run, yes=yes, action=lambda: restoring.cleanup(fleet, ebs, undo, out))
            out.finish({"dry_run": dry_run, "plan": undo, "deleted": deleted or []})
            return
        plan = restoring.plan_restore(fleet, ebs, group, to, at, port)
        result = mutate(out, fleet, operation="snapshot-restore", target=to, targets=[to],
                        title=f"Restore group {group} onto {to}", steps=plan.steps(), dry_run=dry_run, yes=yes,
                        action=lambda: restoring.restore(fleet, ebs, plan, out))
        if result is None:
            out.finish({"dry_run": dry_run, "plan": plan})
            return
        out.table(None, ["mount", "restored at"], [[m, p] for m, p in result.mounted.items()])
        if result.postgres:
            out.log(f"Postgres is running on the restored data: {result.postgres['psql']}")
        out.finish(result)
