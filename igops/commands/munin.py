"""`igops munin`: install igops' Munin plugins on hosts; read a node the way a master does."""

from __future__ import annotations

import typer

from igops.checks import munin
from igops.commands.common import DRY_RUN_OPTION, JSON_OPTION, YES_OPTION, command, exit_with, load_fleet, mutate
from igops.errors import ExitCode
from igops.operations import conflicts
from igops.output import plural
from igops.tables import Column

# Its help, which `igops --help` lists too, is in igops.command_table.COMMANDS.
app = typer.Typer(no_args_is_help=True)


@app.command("install")
def install(
    ctx: typer.Context,
    role: list[str] | None = typer.Option(
        None, "--role", "-r", help="Only hosts with this role (repeatable; default: every host with the munin role)."
    ),
    restart: bool = typer.Option(False, "--restart", help="Restart munin-node even if nothing changed."),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Install the plugins for each host's services: the script, its links, its plugin-conf,
    and a munin-node restart where anything changed."""

    with command(ctx, "munin install", json_flag) as out:
        fleet = load_fleet(ctx)
        plan = munin.plan_install(fleet, role)
        names = [item.host for item in plan]

        def act() -> list[munin.InstallResult]:
            with out.progress("hosts", total=len(plan)) as advance:
                return munin.install(fleet, plan, always_restart=restart, on_done=lambda _: advance(1))

        def outcome(results: list[munin.InstallResult]) -> tuple[str, int]:
            failed = [result.host for result in results if not result.ok]
            return ("ok" if not failed else "failed on " + ", ".join(failed)), _exit_code(results)

        results = mutate(
            out,
            fleet,
            kind="munin-install",
            resources=[conflicts.MUNIN],
            targets=names,
            title=f"Install igops' Munin plugins on {plural(len(plan), 'host')}",
            steps=[step for item in plan for step in item.steps()],
            dry_run=dry_run,
            yes=yes,
            action=lambda _: act(),
            outcome=outcome,
        )
        if results is None:
            out.finish({"dry_run": dry_run, "hosts": [{"host": i.host, "plugins": i.plugins} for i in plan]})
            return
        out.table(
            None,
            [
                "host",
                Column("plugins", wrap=True, drop=2),
                "changed",
                "restarted",
                Column("listed by munin-node", drop=1),
                Column("error", wrap=True),
            ],
            [
                [r.host, r.plugins, len(r.changed), r.restarted, all(p in r.listed for p in r.plugins), r.error]
                for r in results
            ],
        )
        code = _exit_code(results)
        out.finish({"hosts": results}, code)
        exit_with(code)


def _exit_code(results: list[munin.InstallResult]) -> int:
    failed = sum(not result.ok for result in results)
    if not failed:
        return ExitCode.OK
    return ExitCode.FAILED if failed == len(results) else ExitCode.PARTIAL


@app.command("fetch")
def fetch(
    ctx: typer.Context,
    host: str = typer.Argument(..., help="The host whose munin-node to ask."),
    plugin: str | None = typer.Argument(None, help="One plugin (default: every plugin the node lists)."),
    config: bool = typer.Option(False, "--config", help="Also ask for each plugin's config: labels, types, limits."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """Fetch values from a munin-node over its own protocol (port 4949), as munin-update does."""

    with command(ctx, "munin fetch", json_flag) as out:
        fleet = load_fleet(ctx)
        found = munin.fetch(fleet, host, plugin, config)
        columns: list[Column | str] = ["plugin", Column("graph", drop=1), "field", "value"]
        if config:
            columns += [Column("type", drop=2), "warning", "critical"]
        rows = []
        for entry in found:
            for field in entry["fields"]:
                row = [entry["plugin"], field.graph, field.name, "U" if field.value is None else f"{field.value:g}"]
                rows.append(row + ([field.type, field.warning, field.critical] if config else []))
            for complaint in entry["complaints"]:
                rows.append([entry["plugin"], "", "", f"# {complaint}"] + (["", "", ""] if config else []))
        out.table(f"{host}: {plural(len(found), 'plugin')}", columns, rows)
        out.finish({"host": host, "plugins": found})
