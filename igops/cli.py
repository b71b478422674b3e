"""The root of the `igops` command: global options and the command groups."""

from __future__ import annotations

import typer

from igops import __version__
from igops.commands import check, fleet, lab, munin, pagerduty, pg, pingdom, snapshot, warm
from igops.commands import deploy as deploy_commands
from igops.commands import redis as redis_commands
from igops.commands import shard as shard_commands
from igops.commands.common import GlobalOptions

app = typer.Typer(
    name="igops",
    help="Operations for a photo-sharing fleet: snapshots, cache warming, failover, shard moves, "
    "deploys and checks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"igops {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: str = typer.Option(None, "--config", "-c", metavar="FILE",
                               help="Inventory file (default: $IGOPS_CONFIG, then /etc/igops/igops.toml)."),
    json_output: bool = typer.Option(False, "--json", help="Only a JSON envelope on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail on stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    ctx.obj = GlobalOptions(config=config, json=json_output, verbose=verbose)


fleet.register(app)
app.add_typer(snapshot.app, name="snapshot")
app.add_typer(lab.app, name="lab")
app.add_typer(warm.app, name="warm")
check.register(app)
app.add_typer(munin.app, name="munin")
app.add_typer(pingdom.app, name="pingdom")
app.add_typer(pagerduty.app, name="pagerduty")
app.add_typer(shard_commands.app, name="shard")
app.add_typer(deploy_commands.app, name="deploy")
app.add_typer(pg.app, name="pg")
app.add_typer(redis_commands.app, name="redis")


def main() -> None:
    app()
