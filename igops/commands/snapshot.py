"""`igops snapshot`: consistent XFS-freeze EBS snapshot groups."""

from __future__ import annotations

import functools
import sys
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import typer

from igops import safety, snapshot, snapshot_cron, snapshot_groups, snapshot_policy, snapshot_prune
from igops.commands import snapshot_drill, snapshot_restore
from igops.commands.common import DRY_RUN_OPTION, JSON_OPTION, YES_OPTION, command, exit_with, load_fleet, mutate
from igops.ebs import Ebs, tags_of
from igops.errors import AlreadyRunning, IgopsError, UsageError
from igops.operations import conflicts
from igops.output import Output, Reporter, plural
from igops.pg import archive_repository
from igops.tables import Column

if TYPE_CHECKING:
    from igops.inventory import Fleet

# Its help, which `igops --help` lists too, is in igops.command_table.COMMANDS.
app = typer.Typer(no_args_is_help=True)


def _group_row(group: snapshot_groups.SnapshotGroup) -> list[Any]:
    return [
        group.group_id,
        group.host,
        group.mounts,
        f"{group.volumes}/{group.expected}",
        group.state,
        f"{group.created:%Y-%m-%d %H:%M:%S}",
        f"{group.size_gib} GiB",
        f"{group.freeze_ms:.0f} ms" if group.freeze_ms is not None else None,
        "kept" if group.kept else None,
    ]


# The group id is what every other snapshot command takes: it stays whole at any width.
GROUP_COLUMNS: list[Column | str] = [
    "group",
    "host",
    Column("mounts", wrap=True, drop=2),
    Column("volumes", drop=3),
    "state",
    Column("created (UTC)", drop=1),
    Column("size", drop=4),
    Column("freeze", drop=5),
    "kept",
]
ACCEPT_RISK_OPTION = typer.Option(
    False,
    "--accept-risk",
    help="Delete even a kept group, or one its set cannot spare (below its minimum "
    "redundancy); the plan names each risk accepted.",
)


@app.command("create")
def create(
    ctx: typer.Context,
    host: str = typer.Argument(..., help="The host whose data filesystems to snapshot."),
    mount: list[str] | None = typer.Option(
        None, "--mount", "-m", help="A mount point (repeatable; default: the host's data mounts)."
    ),
    deadline: float | None = typer.Option(
        None, "--deadline", min=1, max=120, help="Hard thaw deadline in seconds (default from the inventory, 10)."
    ),
    hook: bool = typer.Option(True, "--hook/--no-hook", help="Run the role's pre-freeze hook."),
    allow_primary: bool = typer.Option(
        False,
        "--allow-primary",
        help="Freeze a live Postgres primary (its writes stall until the thaw); refused otherwise: snapshot a standby.",
    ),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Freeze the host's filesystems, snapshot every volume under them at once, thaw, tag."""

    with command(ctx, "snapshot create", json_flag) as out:
        relative = [path for path in mount or [] if not path.startswith("/")]
        if relative:
            raise UsageError(
                f"--mount {relative[0]!r} is not an absolute path",
                "name the mount point from the root, e.g. --mount /data",
            )
        fleet = load_fleet(ctx)
        with out.step(f"discover the volumes under {host}'s mounts"):
            plan = snapshot.plan_create(fleet, host, mount, deadline=deadline, hook=hook, allow_primary=allow_primary)
        try:
            result = mutate(
                out,
                fleet,
                kind="snapshot-create",
                resources=conflicts.for_host(fleet, host),
                targets=[host],
                title=f"Snapshot group {plan.group_id}: {plural(len(plan.volumes), 'volume')} under "
                f"{', '.join(plan.mounts)} on {host}",
                steps=plan.steps(),
                dry_run=dry_run,
                yes=yes,
                action=lambda reporter: snapshot.create(fleet, plan, reporter),
                params={
                    "host": host,
                    "group": plan.group_id,
                    "mounts": mount,
                    "deadline": deadline,
                    "hook": hook,
                    "allow_primary": allow_primary,
                },
                outcome=lambda r: (f"group {r.group_id} complete, freeze {r.freeze_window_ms:.0f} ms", 0),
            )
        except snapshot.SnapshotFailed as failed:
            out.table(
                None,
                ["group", "state", Column("freeze window", drop=1), Column("error", wrap=True)],
                [[failed.result.group_id, failed.result.state, failed.result.freeze_window_ms, failed.result.error]],
            )
            raise
        if result is None:
            out.finish({"dry_run": dry_run, "plan": plan})
            return
        out.table(
            None,
            [
                "group",
                "state",
                Column("volumes", drop=2),
                Column("freeze window", drop=1),
                Column("thawed by", wrap=True, drop=3),
            ],
            [
                [
                    result.group_id,
                    result.state,
                    len(result.snapshots),
                    f"{result.freeze_window_ms:.0f} ms",
                    result.thawed_by,
                ]
            ],
        )
        out.finish(result)


@app.command("list")
def list_groups(
    ctx: typer.Context,
    host: str | None = typer.Option(None, "--host", "-H", help="Only this host's groups."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """Snapshot groups, newest first."""

    with command(ctx, "snapshot list", json_flag) as out:
        fleet = load_fleet(ctx)
        if host:
            fleet.host(host)
        found = snapshot_groups.groups(Ebs(fleet), host)
        out.table(f"{len(found)} snapshot groups", GROUP_COLUMNS, [_group_row(g) for g in found])
        out.finish(
            {
                "groups": [
                    {
                        **{k: v for k, v in g.__dict__.items() if k not in ("snapshots", "strays")},
                        "wal": g.wal and g.wal.describe(),
                        "strays": [stray["SnapshotId"] for stray in g.strays],
                    }
                    for g in found
                ]
            }
        )


@app.command("show")
def show(
    ctx: typer.Context,
    group: str = typer.Argument(..., help="A group id from `igops snapshot list`."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """One group: its snapshots, their volumes, mounts, devices and RAID order."""

    with command(ctx, "snapshot show", json_flag) as out:
        fleet = load_fleet(ctx)
        found = snapshot_groups.find_group(Ebs(fleet), group)
        out.table(None, GROUP_COLUMNS, [_group_row(found)])
        rows = []
        for item in found.snapshots:
            tags = tags_of(item)
            rows.append(
                [
                    item["SnapshotId"],
                    item["VolumeId"],
                    tags.get(snapshot_groups.TAG_MOUNT),
                    tags.get(snapshot_groups.TAG_DEVICE),
                    tags.get(snapshot_groups.TAG_RAID_INDEX),
                    item["State"],
                    f"{item.get('VolumeSize', 0)} GiB",
                ]
            )
        # Never restored, deleted with the group: see docs/snapshot.md.
        rows += [
            [
                item["SnapshotId"],
                item["VolumeId"],
                "(a stray)",
                None,
                None,
                item["State"],
                f"{item.get('VolumeSize', 0)} GiB",
            ]
            for item in found.strays
        ]
        out.table(
            "snapshots",
            [
                "snapshot",
                "volume",
                Column("mount", drop=1),
                Column("device", drop=2),
                Column("RAID #", drop=3),
                "state",
                Column("size", drop=4),
            ],
            rows,
        )
        if found.wal:
            mark = found.wal
            out.table(
                "WAL (a restore replays the cluster's archive from, and is consistent at)",
                ["cluster", "from", "consistent at", "timeline"],
                [[mark.cluster, mark.start, mark.end, mark.timeline]],
            )
        out.finish({"group": found})


@app.command("prune")
def prune(
    ctx: typer.Context,
    keep_last: int = typer.Option(0, "--keep-last", min=0, help="Keep the N newest complete groups per set of data."),
    keep_hourly: int = typer.Option(
        0, "--keep-hourly", min=0, help="Keep the newest group of each of the last N hours with one."
    ),
    keep_daily: int = typer.Option(0, "--keep-daily", min=0, help="… of each of the last N days."),
    keep_weekly: int = typer.Option(0, "--keep-weekly", min=0, help="… of each of the last N ISO weeks."),
    keep_monthly: int = typer.Option(0, "--keep-monthly", min=0, help="… of each of the last N months."),
    host: str | None = typer.Option(None, "--host", "-H", help="Only delete this host's groups."),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Delete old groups, by the --keep-* counts or else the inventory's [snapshot] policy.

    Per set of data (a Postgres cluster, the Redis set, a host): only complete groups count; its
    newest complete group, kept groups and its minimum redundancy are never deleted."""

    with command(ctx, "snapshot prune", json_flag) as out:
        fleet = load_fleet(ctx)
        if host:
            fleet.host(host)
        flags = snapshot_policy.Retention(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly)
        sets = snapshot_policy.data_sets(fleet)
        if flags.empty() and all(data_set.policy.retention.empty() for data_set in sets):
            raise UsageError(
                "no retention given",
                "pass --keep-last/--keep-hourly/--keep-daily/--keep-weekly/"
                "--keep-monthly, or set keep_* in the inventory's [snapshot] policy",
            )
        ebs = Ebs(fleet)
        groups = snapshot_groups.groups(ebs)
        plan = snapshot_policy.plan_prune(
            groups,
            *snapshot_policy.prune_rules(sets, flags),
            datetime.now(UTC),
            timedelta(minutes=fleet.model.snapshot.stale_after_minutes),
            host,
        )
        plan = archive_repository.for_prune(fleet, groups, plan)
        result: snapshot_prune.PruneResult | None = None
        if not plan.empty():
            result = mutate(
                out,
                fleet,
                kind="snapshot-prune",
                resources=[conflicts.SNAPSHOTS],
                targets=[host or "all"],
                title=f"Delete {plural(len(plan.delete), 'snapshot group')}, keep {len(plan.keep)}"
                + (
                    f"; expire the WAL no group left needs ({', '.join(e.cluster for e in plan.wal)})"
                    if plan.wal
                    else ""
                ),
                steps=plan.steps(),
                dry_run=dry_run,
                yes=yes,
                action=lambda reporter: snapshot_prune.prune(fleet, ebs, plan, reporter),
                outcome=lambda done: (done.summary(), 0),
                notes=plan.notes(),
            )
        else:
            out.log("nothing to delete")
        out.table(
            None,
            ["group", Column("kept because", wrap=True)],
            [[group_id, reasons] for group_id, reasons in plan.keep.items()]
            + [[group_id, f"in use: {reading}"] for group_id, reading in (result.in_use if result else {}).items()],
        )
        out.finish(
            {
                "dry_run": dry_run,
                "keep": plan.keep,
                "delete": [g.group_id for g in plan.delete],
                "deleted": result.deleted if result else [],
                "in_use": result.in_use if result else {},
                "wal": [expiry.describe() for expiry in plan.wal],
            }
        )


@app.command("delete")
def delete(
    ctx: typer.Context,
    group: str = typer.Argument(..., metavar="GROUP", help="A group id from `igops snapshot list`."),
    accept_risk: bool = ACCEPT_RISK_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Delete one snapshot group (every snapshot in it).

    Refused (exit 3) for a kept group, a group still being taken, and a complete group its set of
    data cannot spare (its last, or below its minimum redundancy), unless --accept-risk."""

    with command(ctx, "snapshot delete", json_flag) as out:
        fleet = load_fleet(ctx)
        ebs = Ebs(fleet)
        plan = snapshot_policy.plan_delete(fleet, snapshot_groups.groups(ebs), group, datetime.now(UTC), accept_risk)
        found = plan.group
        deleted = mutate(
            out,
            fleet,
            kind="snapshot-delete",
            resources=plan.resources(),
            targets=[found.host],
            title=f"Delete snapshot group {found.group_id} ({found.host}, {found.state}, "
            f"{found.created:%Y-%m-%d %H:%M} UTC, {plural(found.volumes, 'snapshot')})",
            steps=plan.steps(),
            dry_run=dry_run,
            yes=yes,
            action=lambda _: snapshot_prune.delete(fleet, ebs, plan),
            outcome=lambda done: (f"deleted {done}", 0),
        )
        out.finish(
            {
                "dry_run": dry_run,
                "group": found.group_id,
                "risks_accepted": plan.risks,
                "deleted": [deleted] if deleted else [],
            }
        )


@app.command("keep")
def keep(
    ctx: typer.Context,
    group: str = typer.Argument(..., metavar="GROUP", help="A group id from `igops snapshot list`."),
    release: bool = typer.Option(False, "--release", help="Unpin the group: prune may delete it again."),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Pin a group so prune never deletes it (and delete refuses it); --release unpins it.

    The pin is a tag (igops:keep) on the group's snapshots, saying when and by whom."""

    with command(ctx, "snapshot keep", json_flag) as out:
        fleet = load_fleet(ctx)
        ebs = Ebs(fleet)
        found = snapshot_groups.find_group(ebs, group)
        value = None if release else snapshot_prune.keep_value(f"{safety.operator_user()}@{safety.operator_host()}")
        ids = ", ".join(item["SnapshotId"] for item in found.snapshots)
        step = (
            f"remove the tag {snapshot_groups.TAG_KEEP} from {ids}"
            if release
            else f"tag {ids} with {snapshot_groups.TAG_KEEP}={value}"
        )

        def act_keep(_: Reporter) -> bool:
            snapshot_prune.set_keep(ebs, found, value)
            return True

        changed = mutate(
            out,
            fleet,
            kind="snapshot-keep",
            resources=[conflicts.SNAPSHOTS],
            targets=[found.host],
            title=f"{'Release' if release else 'Keep'} snapshot group {found.group_id}",
            steps=[step],
            dry_run=dry_run,
            yes=yes,
            action=act_keep,
            outcome=lambda _: ("released" if release else "kept", 0),
        )
        out.finish({"dry_run": dry_run, "group": found.group_id, "kept": value, "changed": bool(changed)})


@app.command("cron")
def cron(
    ctx: typer.Context,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Take the groups the [snapshot] policy says are due, then prune what it allows.

    For cron, every minute: prints nothing and exits 0 when nothing is due; a run that finds the
    previous one still working exits 0 at once, doing nothing. A Postgres cluster is snapshotted
    on one streaming standby, the Redis set on one linked replica. Exit 1 when every due group
    failed, 5 when some did."""

    with command(ctx, "snapshot cron", json_flag) as out:
        fleet = load_fleet(ctx)
        ebs = Ebs(fleet)
        holding = (
            nullcontext(True) if dry_run else snapshot_cron.lease(fleet, safety.redact_argv(["igops", *sys.argv[1:]]))
        )
        with holding as held:
            if not held:
                if out.verbose:
                    out.log("another `igops snapshot cron` is still working: nothing to do")
                out.finish(
                    {
                        "dry_run": dry_run,
                        "busy": True,
                        "due": [],
                        "taken": [],
                        "failed": [],
                        "skipped": [],
                        "deleted": [],
                        "keep": {},
                        "wal": [],
                    }
                )
                return
            report = _cron_run(out, fleet, ebs, dry_run, yes)
        code = 0
        if report["failed"]:
            code = 5 if report["taken"] or report["deleted"] else 1
            for failure in report["failed"]:
                out.err.print(
                    f"error: {failure['set']}: {failure['error']}"
                    + (f" — {failure['hint']}" if failure.get("hint") else ""),
                    markup=False,
                )
        out.finish(
            report,
            code,
            {
                "message": "; ".join(f"{failure['set']}: {failure['error']}" for failure in report["failed"]),
                "hint": "see each line's hint; the next run tries again",
            }
            if code
            else None,
        )
        exit_with(code)


def _cron_run(out: Output, fleet: Fleet, ebs: Ebs, dry_run: bool, yes: bool) -> dict[str, Any]:
    if not snapshot_cron.has_policy(fleet):
        raise UsageError(
            "the inventory's [snapshot] policy schedules nothing and keeps no counts: snapshot cron has nothing to do",
            'set [snapshot] schedule (e.g. "every 6h") and keep_* counts; see docs/snapshot.md',
        )
    now = datetime.now(UTC)
    groups = snapshot_groups.groups(ebs)
    due = snapshot_cron.due_sets(fleet, groups, now)
    report: dict[str, Any] = {
        "dry_run": dry_run,
        "busy": False,
        "due": [data_set.name for data_set in due],
        "taken": [],
        "failed": [],
        "skipped": [],
        "deleted": [],
        "keep": {},
        "wal": [],
    }
    for data_set in due:
        take = snapshot_cron.choose(fleet, data_set)
        plan = snapshot_cron.plan_take(fleet, ebs, take)
        if plan is None:
            report["failed"].append({"set": take.set_name, "host": take.host, "error": take.error, "hint": take.hint})
            continue
        assert take.host is not None, "a take with a plan has its member"
        try:
            result = mutate(
                out,
                fleet,
                kind="snapshot-create",
                resources=conflicts.for_host(fleet, take.host),
                targets=[take.host],
                params={"host": take.host},
                title=f"Snapshot {take.label} on {take.host} ({take.why}): group {plan.group_id}",
                steps=plan.steps(),
                dry_run=dry_run,
                yes=yes,
                action=functools.partial(snapshot.create, fleet, plan),
                outcome=lambda r: (f"group {r.group_id} complete", 0),
            )
        except AlreadyRunning as busy:
            # A person is taking this host's group right now: it counts once it completes.
            report["skipped"].append({"set": take.set_name, "host": take.host, "why": busy.message})
            continue
        except UsageError:
            raise  # not confirmed: nothing was done, and nothing more may be
        except IgopsError as failed:
            report["failed"].append(
                {"set": take.set_name, "host": take.host, "error": failed.message, "hint": failed.hint}
            )
            continue
        report["taken"].append(
            {
                "set": take.set_name,
                "host": take.host,
                "why": take.why,
                "group_id": result.group_id if result else plan.group_id,
            }
        )
    if report["taken"] and not dry_run:
        groups = snapshot_groups.groups(ebs)  # the new groups count toward retention
    try:
        prune_plan = snapshot_cron.plan_prune(fleet, groups, now)
        report["keep"] = prune_plan.keep
        report["wal"] = [expiry.describe() for expiry in prune_plan.wal]
        if prune_plan.empty():
            return report
        pruned = mutate(
            out,
            fleet,
            kind="snapshot-prune",
            resources=[conflicts.SNAPSHOTS],
            targets=["all"],
            title=f"Prune what the [snapshot] policy lets go: delete "
            f"{plural(len(prune_plan.delete), 'group')}, keep {len(prune_plan.keep)}",
            steps=prune_plan.steps(),
            dry_run=dry_run,
            yes=yes,
            action=lambda reporter: snapshot_prune.prune(fleet, ebs, prune_plan, reporter),
            outcome=lambda done: (done.summary(), 0),
            notes=prune_plan.notes(),
        )
        if pruned:
            report["deleted"] = pruned.deleted
            report["skipped"] += [
                {"set": "prune", "host": None, "why": f"group {group_id} left, in use: {reading}"}
                for group_id, reading in pruned.in_use.items()
            ]
    except AlreadyRunning:
        pass  # a person is pruning right now; whatever is left, the next run prunes
    except UsageError:
        raise
    except IgopsError as failed:
        report["failed"].append({"set": "prune", "host": None, "error": failed.message, "hint": failed.hint})
    return report


# `snapshot restore` and `snapshot drill` live in modules of their own (their options are many).
app.command("restore")(snapshot_restore.restore)
app.command("drill")(snapshot_drill.drill)
