"""`igops pingdom`: the fleet's outside-in HTTP checks as code, their status, maintenance windows."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import typer

from igops.checks import pingdom
from igops.commands.common import DRY_RUN_OPTION, JSON_OPTION, YES_OPTION, command, load_fleet, mutate
from igops.errors import UsageError
from igops.operations import conflicts
from igops.output import plural
from igops.tables import Column

# Its help, which `igops --help` lists too, is in igops.command_table.COMMANDS.
app = typer.Typer(no_args_is_help=True)


@app.command("sync")
def sync(
    ctx: typer.Context,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Create, update or pause Pingdom checks until they match the inventory: each load
    balancer's health URL and [monitoring] public_urls. Only checks igops tagged are touched."""

    with command(ctx, "pingdom sync", json_flag) as out:
        fleet = load_fleet(ctx)
        client = pingdom.Pingdom.for_fleet(fleet, reporter=out)
        try:
            with out.step("compare the inventory's checks with Pingdom's"):
                plan = pingdom.plan_sync(client, fleet)
            done: list[dict[str, Any]] | None
            if not plan.changes:
                out.log(f"in sync: {plural(len(plan.unchanged), 'check')} tagged {plan.tag}")
                done = []
            else:
                done = mutate(
                    out,
                    fleet,
                    kind="pingdom-sync",
                    resources=[conflicts.PINGDOM],
                    targets=[plan.tag],
                    title=f"Make Pingdom match the inventory: {plural(len(plan.changes), 'change')}",
                    steps=plan.steps(),
                    dry_run=dry_run,
                    yes=yes,
                    action=lambda reporter: pingdom.apply_sync(client, plan, reporter),
                    outcome=lambda applied: (f"{plural(len(applied), 'change')} applied", 0),
                )
            out.table(
                None,
                ["action", "check", "id", Column("differences", wrap=True)],
                [
                    [
                        change.action if done else f"{change.action} (planned)",
                        change.name,
                        change.check_id,
                        "; ".join(change.differences),
                    ]
                    for change in plan.changes
                ]
                + [["unchanged", name, None, None] for name in plan.unchanged],
            )
        finally:
            client.close()
        out.finish(
            {
                "dry_run": dry_run,
                "tag": plan.tag,
                "changes": plan.changes,
                "unchanged": plan.unchanged,
                "applied": done or [],
            }
        )


@app.command("status")
def status(
    ctx: typer.Context,
    window: str = typer.Option("24h", "--window", "-w", help="Uptime over this window, e.g. 1h, 24h, 7d."),
    include_all: bool = typer.Option(False, "--all", help="Every check in the account, not only igops'."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """Each check's status, last response time and uptime over a window."""

    with command(ctx, "pingdom status", json_flag) as out:
        fleet = load_fleet(ctx)
        seconds = pingdom.parse_duration(window)
        client = pingdom.Pingdom.for_fleet(fleet, reporter=out)
        try:
            found = pingdom.statuses(client, fleet, seconds, include_all)
        finally:
            client.close()
        out.table(
            plural(len(found), "Pingdom check"),
            [
                "id",
                "check",
                "host",
                "status",
                Column("last response", drop=2),
                Column(f"uptime ({window})", drop=1),
                Column("last test (UTC)", drop=3),
            ],
            [
                [
                    c.id,
                    c.name,
                    c.target,
                    c.status,
                    f"{c.last_response_ms} ms" if c.last_response_ms is not None else None,
                    f"{c.uptime_percent:.3f} %" if c.uptime_percent is not None else None,
                    _clock(c.last_test),
                ]
                for c in found
            ],
        )
        out.finish({"window_seconds": seconds, "checks": found})


@app.command("maintenance")
def maintenance(
    ctx: typer.Context,
    duration: str = typer.Option(..., "--for", help="How long, from now: e.g. 10m, 1h."),
    description: str | None = typer.Option(None, "--description", "-d", help="Shown in Pingdom."),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Open a maintenance window now over every check igops manages (deploys use this)."""

    with command(ctx, "pingdom maintenance", json_flag) as out:
        fleet = load_fleet(ctx)
        seconds = pingdom.parse_duration(duration)
        client = pingdom.Pingdom.for_fleet(fleet, reporter=out)
        try:
            checks = client.checks(pingdom.fleet_tag(fleet))
            if not checks:
                raise UsageError(
                    f"Pingdom has no checks tagged {pingdom.fleet_tag(fleet)}", "create them first: igops pingdom sync"
                )
            start = int(time.time())
            text = description or f"igops: {fleet.model.fleet.name} maintenance"
            ids = [int(check["id"]) for check in checks]
            created = mutate(
                out,
                fleet,
                kind="pingdom-maintenance",
                resources=[conflicts.PINGDOM],
                targets=[check["name"] for check in checks],
                title=f"Maintenance window of {duration} over {plural(len(ids), 'Pingdom check')}",
                steps=[
                    f"POST /maintenance: {text!r} from now to {duration} later "
                    f"(about {_clock(start + seconds)} UTC), "
                    f"checks {', '.join(check['name'] for check in checks)}"
                ],
                dry_run=dry_run,
                yes=yes,
                action=lambda _: client.open_maintenance(text, seconds, ids),
                outcome=lambda window: (f"window #{window[0]} until {_clock(window[1])}", 0),
            )
        finally:
            client.close()
        window_id, end = created if created is not None else (None, start + seconds)
        if window_id is not None:
            out.text(f"maintenance window #{window_id} until {_clock(end)} UTC over {plural(len(ids), 'check')}")
        out.finish({"dry_run": dry_run, "id": window_id, "from": start, "to": end, "check_ids": ids})


def _clock(timestamp: int | str | None) -> str | None:
    if not timestamp:
        return None
    return datetime.fromtimestamp(int(timestamp), UTC).strftime("%Y-%m-%d %H:%M:%S")
