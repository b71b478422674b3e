"""`igops pagerduty`: prove the paging path end to end, and show what igops has open."""

from __future__ import annotations

import socket
from typing import Any

import typer

from igops.commands.common import DRY_RUN_OPTION, JSON_OPTION, YES_OPTION, command, load_fleet, mutate
from igops.errors import RemoteError
from igops.operations import conflicts
from igops.pagerduty.incidents import Pager, dedup_key, describe_failure
from igops.tables import Column

# Its help, which `igops --help` lists too, is in igops.command_table.COMMANDS.
app = typer.Typer(no_args_is_help=True)


@app.command("test")
def test(
    ctx: typer.Context,
    keep_open: bool = typer.Option(
        False, "--keep-open", help="Leave the test incident open (resolve it with the next test, or in PagerDuty)."
    ),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Trigger a test incident through the configured routing key, then resolve it."""

    with command(ctx, "pagerduty test", json_flag) as out:
        fleet = load_fleet(ctx)
        pager = Pager(fleet, out)
        pager.prepare()
        source = socket.gethostname()
        key = dedup_key(fleet.model.fleet.name, "test", source)
        steps = [f"trigger a test incident (severity info, dedup key {key}) at {pager.url}"]
        if not keep_open:
            steps.append(f"resolve {key}")

        def act() -> dict[str, Any]:
            done = {"dedup_key": key, "triggered": False, "resolved": False}
            try:
                with out.step("trigger"):
                    pager.trigger("test", source, "igops pagerduty test: the paging path works", severity="info")
                done["triggered"] = True
                if not keep_open:
                    with out.step("resolve"):
                        pager.resolve(key)
                    done["resolved"] = True
            except Exception as exc:  # noqa: BLE001 - the client's own message may quote the request
                raise RemoteError(
                    f"PagerDuty at {pager.url}: {describe_failure(exc)}",
                    "check [monitoring] pagerduty_url and the routing key",
                ) from None
            return done

        result = mutate(
            out,
            fleet,
            kind="pagerduty-test",
            resources=[conflicts.PAGERDUTY],
            targets=[key],
            title="Send a test event to PagerDuty",
            steps=steps,
            dry_run=dry_run,
            yes=yes,
            action=lambda _: act(),
            outcome=lambda done: ("triggered" + (" and resolved" if done["resolved"] else ""), 0),
        )
        if result is not None:
            out.text(
                f"PagerDuty accepted the test event ({key})" + ("; resolved" if result["resolved"] else "; left open")
            )
        out.finish({"dry_run": dry_run, "result": result, "steps": steps})


@app.command("open")
def open_incidents(
    ctx: typer.Context,
    json_flag: bool = JSON_OPTION,
) -> None:
    """The incidents `igops check --page` triggered and has not resolved yet."""

    with command(ctx, "pagerduty open", json_flag) as out:
        fleet = load_fleet(ctx)
        incidents = Pager(fleet, out).open_incidents()
        out.table(
            f"{len(incidents)} open",
            ["dedup key", "check", "target", Column("since", drop=1), Column("summary", wrap=True)],
            [
                [key, item.get("check"), item.get("target"), item.get("since"), item.get("summary")]
                for key, item in sorted(incidents.items())
            ],
        )
        out.finish({"open": incidents})
